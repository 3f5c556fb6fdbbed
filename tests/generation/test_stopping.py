"""The one stop checker: EOS / stop tokens / stop strings / max tokens / context limit, one finish
vocabulary ("stop" | "length") with the cause in `stop_reason`, shared by Generator and
SpeculativeGenerator; incremental detokenization under it."""

import pytest

from fmstack.commands.generate import cli_finish_reason
from fmstack.generation.generate import Generator
from fmstack.generation.sampling import SamplingParams
from fmstack.generation.speculative import SpeculativeGenerator
from fmstack.generation.stopping import IncrementalDetokenizer, StopChecker
from fmstack.loading import load_model


class ByteTokenizer:
    """Token i < 256 is byte i: lets the test split a multi-byte character across tokens."""

    eos_ids = frozenset()

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def feed(checker, tokens):
    text = ""
    for t in tokens:
        text += checker.add(t)
        if checker.finished:
            break
    return text


def test_incremental_detokenizer_never_emits_broken_utf8():
    text = "héllo 🙂 wörld ✓"
    detok = IncrementalDetokenizer(ByteTokenizer())
    pieces = [detok.add(b) for b in text.encode()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text


def test_incremental_detokenizer_stop_string_is_held_back_and_cut():
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["END"])
    out = "".join(detok.add(b) for b in "abc ENxEND tail".encode() if not detok.stopped) + detok.flush()
    assert out == "abc ENx" and detok.stopped and detok.stop_string == "END"


def test_eos_stops_unless_ignored_and_is_not_text():
    c = StopChecker(SamplingParams(max_new_tokens=10), eos_ids={0}, tokenizer=ByteTokenizer())
    assert feed(c, b"hi\x00more") == "hi"
    assert (c.finish_reason, c.stop_reason, c.generated, c.text) == ("stop", 0, 3, "hi")
    c = StopChecker(SamplingParams(max_new_tokens=4, ignore_eos=True), eos_ids={0})
    feed(c, [5, 0, 6, 7, 8])
    assert (c.finish_reason, c.stop_reason, c.generated) == ("length", None, 4)
    # request stop tokens stop even with ignore_eos
    c = StopChecker(SamplingParams(max_new_tokens=9, ignore_eos=True), eos_ids={0}, stop_token_ids={7})
    feed(c, [5, 0, 7, 8])
    assert (c.finish_reason, c.stop_reason, c.generated) == ("stop", 7, 3)


def test_stop_string_wins_over_length_on_the_same_token_and_flushes():
    c = StopChecker(SamplingParams(max_new_tokens=5, stop=("cd",)), tokenizer=ByteTokenizer())
    assert feed(c, b"abcde") == "ab"
    assert (c.finish_reason, c.stop_reason, c.generated) == ("stop", "cd", 4)
    c = StopChecker(SamplingParams(max_new_tokens=3, stop=("xyz",)), tokenizer=ByteTokenizer())
    assert feed(c, b"abxy") == "abx"  # the held-back tail comes out when length ends it
    assert c.finish_reason == "length"
    with pytest.raises(RuntimeError, match="after the sequence finished"):
        c.add(1)


def test_context_limit_is_length():
    c = StopChecker(SamplingParams(max_new_tokens=100), prompt_len=6, max_len=8)
    feed(c, range(10, 20))
    assert (c.finish_reason, c.generated) == ("length", 2)


def test_generator_and_speculative_agree_on_stops():
    tiny = load_model("random:tiny-gqa", seed=0).model
    prompt = [7, 3, 99, 250, 4]
    free = Generator(tiny, eos_ids=[]).generate([prompt], SamplingParams(max_new_tokens=8))[0].token_ids
    eos = free[2]
    gen = Generator(tiny, eos_ids=[eos])
    plain = gen.generate([prompt], SamplingParams(max_new_tokens=8))[0]
    spec = SpeculativeGenerator(gen, Generator(tiny, eos_ids=[eos]), 3).generate(prompt, SamplingParams(max_new_tokens=8))
    for out in (plain, spec):
        assert out.token_ids == free[:free.index(eos) + 1]
        assert (out.finish_reason, out.stop_reason, cli_finish_reason(out)) == ("stop", eos, "eos")
    spec = SpeculativeGenerator(Generator(tiny, eos_ids=[]), Generator(tiny, eos_ids=[]), 3)
    out = spec.generate(prompt, SamplingParams(max_new_tokens=5))
    assert (out.token_ids, out.finish_reason, cli_finish_reason(out)) == (free[:5], "length", "length")
