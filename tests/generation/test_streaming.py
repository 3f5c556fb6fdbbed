"""Streaming with the real byte-level BPE tokenizer: multi-byte characters split across tokens are
never emitted half-done, and the streamed pieces add up to the final text."""

from fmstack.generation.stopping import IncrementalDetokenizer
from fmstack.tokenizer import load_tokenizer

TEXT = "Grüße aus Köln 🙂🎉 — 東京タワー ✓ naïve café"


def test_stream_real_tokenizer_multibyte(smollm2_gguf):
    tok = load_tokenizer(smollm2_gguf)
    ids = tok.encode(TEXT)
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids))), "no split character"
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == TEXT
