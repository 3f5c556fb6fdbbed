"""Data files -> token windows with loss masks; clear errors for bad files."""

from __future__ import annotations

import pytest
import torch

from fmstack.errors import ParameterError
from fmstack.train.data import IGNORE, BatchSchedule, DataError, load_dataset
from tests.train.conftest import QA, TEXT, write_jsonl


def targets(ds, row: int) -> list[int]:
    return [t for t in ds.labels[row].tolist() if t != IGNORE]


def test_text_windows_cover_the_stream(tokenizer, text_file):
    ids = tokenizer.encode(TEXT)
    ds = load_dataset(text_file, tokenizer, seq_len=8, max_seq_len=128)
    assert ds.kind == "txt" and ds.seq_len == 8 and len(ds) == -(-(len(ids) - 1) // 8)
    for r in range(len(ds)):  # window r: inputs ids[8r : 8r+8], labels shifted by one
        n = min(8, len(ids) - 1 - 8 * r)
        assert ds.inputs[r, :n].tolist() == ids[8 * r:8 * r + n]
        assert ds.labels[r, :n].tolist() == ids[8 * r + 1:8 * r + 1 + n]
        assert (ds.labels[r, n:] == IGNORE).all()
    assert ds.trained_tokens == len(ids) - 1


def test_prompt_tokens_are_masked(tokenizer, qa_jsonl):
    ds = load_dataset(qa_jsonl, tokenizer, seq_len=None, max_seq_len=128)
    assert ds.kind == "prompt-completion" and len(ds) == len(QA)
    for r, rec in enumerate(QA):
        prompt = tokenizer.encode(rec["prompt"])
        completion = tokenizer.encode(rec["completion"], add_bos=False) + [tokenizer.eos_id]
        assert targets(ds, r) == completion
        n = len(prompt) + len(completion) - 1
        assert ds.inputs[r, :n].tolist() == (prompt + completion)[:-1]
        assert (ds.labels[r, :len(prompt) - 1] == IGNORE).all()  # no loss on predicting the prompt
    assert ds.seq_len % 16 == 0  # the longest example, rounded up


def test_chat_trains_on_assistant_turns_only(tokenizer, tmp_path):
    msgs = [{"role": "user", "content": "Name a fruit"}, {"role": "assistant", "content": "Mango, surely."},
            {"role": "user", "content": "And a colour?"}, {"role": "assistant", "content": "Teal."}]
    ds = load_dataset(write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}]), tokenizer, None, 128)
    trained = tokenizer.decode(targets(ds, 0))
    assert "Mango, surely." in trained and "Teal." in trained
    assert "fruit" not in trained and "colour" not in trained and "user" not in trained
    full = tokenizer.apply_chat_template(msgs, add_generation_prompt=False)
    n = int((ds.inputs[0] != tokenizer.eos_id).sum())  # the rendered chat, tokenized segment by segment
    assert tokenizer.decode(ds.inputs[0, :n].tolist()) in full


def test_text_records_and_mixed(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [{"text": "hello world"}, QA[0], ""])
    ds = load_dataset(path, tokenizer, 32, 128)
    assert ds.kind == "mixed" and len(ds) == 2 and ds.seq_len == 32
    assert targets(ds, 0) == tokenizer.encode("hello world")[1:] + [tokenizer.eos_id]


@pytest.mark.parametrize("records, match", [
    ([{"prompt": "a"}], r"mix\.jsonl:1: field 'completion' must be a string \(missing\)"),
    ([QA[0], {"question": "a", "answer": "b"}], r":2: missing fields: expected \"prompt\" and \"completion\".*"
                                                r"found keys \['answer', 'question'\]"),
    ([{"prompt": "a", "completion": 3}], r"'completion' must be a string \(a int\)"),
    (['{"prompt": "a", '], r":1: not valid JSON"),
    (["[1, 2]"], r":1: expected a JSON object, found list"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"no message has role 'assistant'"),
    ([{"messages": [{"role": "user"}]}], r"messages\[0\] must be an object with string 'role' and 'content'"),
    ([{"messages": []}], r"'messages' must be a non-empty list"),
    ([{"text": 5}], r"field 'text' must be a string"),
    ([{"prompt": "a", "completion": ""}], None),  # completion = EOS only: still something to learn
])
def test_bad_records(tokenizer, tmp_path, records, match):
    path = write_jsonl(tmp_path / "mix.jsonl", records)
    if match is None:
        assert load_dataset(path, tokenizer, None, 128).trained_tokens == 1
        return
    with pytest.raises(DataError, match=match):
        load_dataset(path, tokenizer, None, 128)


def test_empty_and_missing_files(tokenizer, tmp_path):
    for name, content in (("e.txt", ""), ("e.jsonl", "  \n\n")):
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match=f"{name}: the file is empty"):
            load_dataset(tmp_path / name, tokenizer, None, 128)
    with pytest.raises(DataError, match="file not found"):
        load_dataset(tmp_path / "nope.jsonl", tokenizer, None, 128)
    (tmp_path / "d.csv").write_text("a,b")
    with pytest.raises(ParameterError, match=r"unsupported file type '\.csv'; use \.txt .* or \.jsonl"):
        load_dataset(tmp_path / "d.csv", tokenizer, None, 128)
    with pytest.raises(DataError, match="no tokenizer"):
        load_dataset(tmp_path / "e.txt", None, None, 128)


def test_too_long_examples(tokenizer, tmp_path):
    long = {"prompt": "word " * 200, "completion": " end"}
    path = write_jsonl(tmp_path / "long.jsonl", [QA[0], long])
    with pytest.raises(DataError, match=r"long\.jsonl:2: example has \d+ tokens, longer than the model's context "
                                        r"\(128 tokens\)"):
        load_dataset(path, tokenizer, None, 128)
    with pytest.raises(DataError, match=r":2: example has \d+ tokens, longer than --seq-len 64; raise --seq-len "
                                        r"\(up to 512\)"):
        load_dataset(path, tokenizer, 64, 512)
    with pytest.raises(ParameterError, match=r"--seq-len 300 is invalid: must be in \[1, 128\]"):
        load_dataset(path, tokenizer, 300, 128)


def test_batch_schedule_is_a_seeded_endless_permutation():
    s = BatchSchedule(5, 3, seed=1)
    rows = torch.cat([s.rows(i) for i in range(5)])  # 15 items = 3 epochs
    for e in range(3):
        assert sorted(rows[5 * e:5 * e + 5].tolist()) == list(range(5))
    assert torch.equal(BatchSchedule(5, 3, seed=1).rows(3), s.rows(3))  # any order of asking
    assert not torch.equal(torch.cat([BatchSchedule(5, 3, seed=2).rows(i) for i in range(5)]), rows)
