"""fmstack.tokenizer against HF transformers (the real SmolLM2 GGUF) and sentencepiece itself."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from fmstack.errors import TokenizerError
from fmstack.tokenizer import load_tokenizer

STRINGS = [
    "", " ", "\t", "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "Café naïve résumé façade Ångström", "e\u0301 and a\u0308 combining marks", "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ", "한국어 텍스트입니다", "Россия и Україна", "مرحبا بالعالم",
    "Emoji: 😀👍🏽🇺🇸 and ❤️", "zero\u200bwidth and\u00a0nbsp", "multiple   internal    spaces",
    "  two leading spaces", " hello", "trailing spaces   ", "tabs\tand\nnewlines\r\nmixed", "\n\n\nthree newlines",
    "12345", "3.14159", "1,000,000", "Numbers 12345 and 3.14159", "ABC123def456", "-42 +7 1e-5 0x1F",
    "def foo(x):\n    return x ** 2  # comment", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<html><body class=\"x\">hi</body></html>", "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n", "text<|endoftext|>more",
]

# Where transformers' GGUF tokenizer is wrong for SmolLM2. The original SmolLM2 tokenizer.json
# pre-tokenizes with Digits(individual_digits=True) *then* the GPT-2 ByteLevel regex (llama.cpp's
# "smollm" pre-tokenizer does the same); transformers builds GGUF "gpt2" vocabularies with plain
# ByteLevel and ignores tokenizer.ggml.pre == "smollm". The digit runs come out the same either way
# (the vocabulary has no multi-digit tokens), but a run of 2+ whitespace characters right before a
# digit differs: GPT-2's regex cuts the last space off to join it to the digits ("  1" -> "Ġ","Ġ","1"),
# while Digits isolates the digit first, so the whole run stays one piece ("ĠĠ","1"). We follow the
# original tokenizer here, and check it against HF's backend with the original pre-tokenizer put back.
# (A fuzz of 20k random strings found no other difference from HF.)
DIGIT_AFTER_SPACES = ["  1", "year  2024", "v  3.0", "x = [\n    1,\n    2]", "a\n\n1"]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def original(hf):
    """HF's backend with SmolLM2's original pre-tokenizer (Digits then ByteLevel) put back."""
    from tokenizers import Tokenizer, pre_tokenizers

    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


def test_smollm2_gguf_metadata(ours):
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (49152, 1, 2, 2, False)
    assert ours.eos_ids == {2, 0}  # <|im_end|> (EOS) and <|endoftext|>
    assert ours.bos_token == "<|im_start|>" and ours.eos_token == "<|im_end|>"
    assert ours.encode("hi", add_bos=True)[0] == 1


@pytest.mark.parametrize("text", STRINGS)
def test_smollm2_ids_match_hf(ours, hf, text):
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text
    assert b"".join(ours.token_bytes(i) for i in ids) == text.encode()


def test_smollm2_special_tokens_are_single_ids(ours):
    assert ours.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert ours.decode([1, 4093, 2], skip_special=True) == "user"


@pytest.mark.parametrize("text", DIGIT_AFTER_SPACES)
def test_smollm2_digits_after_spaces_follow_original(ours, hf, original, text):
    ids = ours.encode(text)
    assert ids == original.encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == text
    # transformers' GGUF tokenizer differs here (see DIGIT_AFTER_SPACES); record, don't require, that.
    if ids == hf.encode(text, add_special_tokens=False):
        pytest.skip("transformers now agrees with the original SmolLM2 tokenizer")


def test_smollm2_digits_are_split_individually(ours):
    assert [ours.decode([i]) for i in ours.encode("12345 3.14159")] == list("12345") + [" ", "3", "."] + list("14159")


def test_smollm2_chat_template_matches_hf(ours, hf):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert ours.apply_chat_template(convo, add_generation_prompt=False) == \
        hf.apply_chat_template(convo, tokenize=False, add_generation_prompt=False)


def test_hf_directory_matches_hf(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.vocab_size) == (1, 2, 2, False, 49152)
    assert 2 in tok.eos_ids and tok.chat_template == hf.chat_template
    for text in STRINGS + DIGIT_AFTER_SPACES:  # this tokenizer.json has HF's plain ByteLevel pre-tokenizer
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == text


def test_hf_directory_bos_from_post_processor(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                              "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                                                  "tokens": ["<|im_start|>"]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.add_bos and tok.encode("hi") == [1, 6004] and tok.encode("hi", add_bos=False) == [6004]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    assert not load_tokenizer(tmp_path).add_bos  # tokenizer_config.json's flag wins


# -- sentencepiece --------------------------------------------------------------------------------

SP_TEXT = """The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
In 1969, 3 astronauts flew 384400 km to the Moon and back; it took about 8 days.
def tokenize(text):    return text.split()   # indentation and  double  spaces
Tokenizers turn text into integers, and the integers back into text again.
Le café est très bon, la crème brûlée aussi. Über Größe und Maß.
""" * 20
SP_STRINGS = [
    "", " ", "Hello world", "The quick brown fox", "  two leading spaces", "trailing  ", "a  b   c",
    "tabs\tand\nnewlines", "numbers 12345 and 3.14", "Le café très bon", "unseen: 世界 🤗 ψ",
    "combining e\u0301", "def f(x):\n    return x*2", "dozen liquor jugs!", "zzzz qqqq",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text(SP_TEXT)
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), model_type="bpe", vocab_size=420,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        control_symbols=["<|im_start|>", "<|im_end|>"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    return d / "tokenizer.model", spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))


def _write_llama_gguf(path, sp, model="llama"):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    n = sp.get_piece_size()
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
             for i in range(n)]
    w.add_tokenizer_model(model)
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(kinds)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_directory_matches_sentencepiece(sp_model, tmp_path):
    model, sp = sp_model
    shutil.copy(model, tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 420)
    im_start, im_end = sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>")
    assert tok.eos_ids == {2, im_end}
    for text in SP_STRINGS:
        assert tok.encode(text) == ([1] if text else [1]) + sp.encode(text), text
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.encode("<|im_start|>user", add_bos=False) == [im_start, *sp.encode("user")]
    assert tok.encode("<s>hi") == [1, *sp.encode("hi")]  # control tokens in the text are matched; no 2nd BOS
    assert tok.token_bytes(sp.piece_to_id("<0x0A>")) == b"\n"


def test_llama_gguf_matches_sentencepiece(sp_model, tmp_path):
    _, sp = sp_model
    tok = load_tokenizer(_write_llama_gguf(tmp_path / "sp.gguf", sp))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 420)
    im_start, im_end = sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>")
    assert tok.eos_ids == {2, im_end}
    for text in SP_STRINGS:
        ids = tok.encode(text, add_bos=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == text == sp.decode(ids)
        assert b"".join(tok.token_bytes(i) for i in ids) == (" " + text).encode() if text else ids == []
    assert tok.encode("<|im_start|>user") == [1, im_start, *sp.encode("user")]  # as llama.cpp: space-prefixed
    rng = random.Random(0)
    for _ in range(300):  # random stretches of the corpus, and random strings over its characters
        start = rng.randrange(len(SP_TEXT))
        text = SP_TEXT[start:start + rng.randrange(1, 60)]
        noise = "".join(rng.choice(SP_TEXT[:400] + "世🤗\t") for _ in range(rng.randrange(1, 20)))
        assert tok.encode(text, add_bos=False) == sp.encode(text), text
        assert tok.encode(noise, add_bos=False) == sp.encode(noise), noise

    # The same vocabulary saved as an HF tokenizer.json directory (sentencepiece-style, not byte-level).
    tok.tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "add_bos_token": True}))
    hf_dir = load_tokenizer(tmp_path)
    assert (hf_dir.bos_id, hf_dir.eos_id, hf_dir.add_bos, hf_dir.eos_ids) == (1, 2, True, {2, im_end})
    for text in SP_STRINGS:
        ids = hf_dir.encode(text)
        assert ids == [1, *sp.encode(text)] and hf_dir.decode(ids, skip_special=True) == text
        assert b"".join(hf_dir.token_bytes(i) for i in ids[1:]) == (" " + text).encode() if text else ids == [1]


def test_chat_template_rendering(sp_model, tmp_path):
    model, sp = sp_model
    shutil.copy(model, tmp_path / "tokenizer.model")
    template = ("{{ bos_token }}{% for m in messages %}\n"
                "    {% if m['role'] == 'system' %}\n"
                "        {{ raise_exception('no system messages') }}\n"
                "    {% endif %}\n"
                "[INST] {{ m['content'] }} [/INST]{{ m | tojson }}\n"
                "{% endfor %}{% if add_generation_prompt %}>{% endif %}")  # trim_blocks/lstrip_blocks eat the layout
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "unused"}, {"name": "default", "template": template}]}))
    tok = load_tokenizer(tmp_path)
    text = tok.apply_chat_template([{"role": "user", "content": "héllo"}])
    assert text == '<s>[INST] héllo [/INST]{"role": "user", "content": "héllo"}\n>'
    assert tok.encode(text).count(tok.bos_id) == 1  # the template's BOS is not doubled
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False)[-1] != ">"
    with pytest.raises(TokenizerError, match="no system messages"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


@pytest.fixture(scope="module")
def byte_level_vocab():
    """A small byte-level BPE (tokens, merges) trained with `tokenizers` on SP_TEXT."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([SP_TEXT], trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


@pytest.mark.parametrize("pre", ["default", "llama-bpe", "qwen2", "gpt-4o", "smollm"])
def test_byte_level_gguf_pre_tokenizers(byte_level_vocab, tmp_path, pre):
    """Each tokenizer.ggml.pre against transformers' tokenizer of the same GGUF."""
    import gguf
    from tokenizers import Tokenizer, pre_tokenizers

    tokens, merges = byte_level_vocab
    w = gguf.GGUFWriter(str(tmp_path / "bl.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_tokenizer(tmp_path / "bl.gguf")
    assert (tok.add_bos, tok.eos_ids) == (False, {0, 2})
    hf = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(tmp_path, gguf_file="bl.gguf")
    if pre == "smollm":  # transformers ignores "smollm" (see DIGIT_AFTER_SPACES): compare with the original
        ref = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
        hf_encode = lambda text: ref.encode(text, add_special_tokens=False).ids  # noqa: E731
    else:
        hf_encode = lambda text: hf.encode(text, add_special_tokens=False)  # noqa: E731
    for text in STRINGS + DIGIT_AFTER_SPACES:
        assert tok.encode(text) == hf_encode(text), text
        assert tok.decode(tok.encode(text)) == text


def test_no_tokenizer_in_directory(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer found"):
        load_tokenizer(tmp_path)


def test_unsupported_gguf_tokenizer(sp_model, tmp_path):
    path = _write_llama_gguf(tmp_path / "rwkv.gguf", sp_model[1], model="rwkv")
    with pytest.raises(TokenizerError, match="unsupported GGUF tokenizer model 'rwkv'"):
        load_tokenizer(path)
