"""Tokenizers for GGUF files, HF `tokenizer.json` directories and sentencepiece `tokenizer.model`s.

All tokenization goes through the `tokenizers` or `sentencepiece` libraries; this module only
assembles them from the files and adds BOS handling, end-of-turn ids and chat templates.

    tok = load_tokenizer("model.gguf")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

from fmstack.errors import FmstackError, TokenizerError

log = logging.getLogger(__name__)

# Tokens that end a chat turn (or a document): generation stops at them when the vocabulary has them.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>",
              "<end_of_turn>", "<|end|>")

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> how text is split before byte-level BPE: the GPT-2 regex (ByteLevel's own),
# digits one by one then the GPT-2 regex, or one of the regexes below (Llama-3's also skips merges
# for words that are whole tokens).
_PRE_GPT2 = ("default", "gpt2", "gpt-2")
_PRE_DIGITS_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b")
_PRE_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral")
_PRE_SPLITS = {
    **dict.fromkeys(_PRE_LLAMA3, _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O),
}


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map to 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}


_CHAR_TO_BYTE = {c: b for b, c in _byte_to_char().items()}
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """Text <-> token ids for one model. Built by `load_tokenizer`; subclasses wrap a backend."""

    bos_id: int | None
    eos_id: int | None
    eos_ids: frozenset[int]  # every id that ends generation: EOS and end-of-turn tokens
    pad_id: int | None
    add_bos: bool  # whether encode() adds BOS by default
    vocab_size: int
    chat_template: str | None

    def configure(self, *, bos_id: int | None, eos_id: int | None, pad_id: int | None, add_bos: bool,
                  chat_template: str | None, extra_eos: Iterable[int] = ()) -> Tokenizer:
        """Set the special ids and defaults; eos_ids gets EOS, `extra_eos` and any END_TOKENS present."""
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos, self.chat_template = add_bos, chat_template
        ends = {self.token_to_id(t) for t in END_TOKENS if self._is_special_token(t)} | set(extra_eos) | {eos_id}
        self.eos_ids = frozenset(i for i in ends if i is not None)
        self.__dict__.pop("_template", None)
        return self

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer so `load_tokenizer(directory)` rebuilds it: the backend's own file
        (tokenizer.json or tokenizer.model) plus tokenizer_config.json (special tokens, add_bos,
        chat template)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._save_backend(d)
        config = {"add_bos_token": self.add_bos, "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "pad_token": self.id_to_token(self.pad_id) if self.pad_id is not None else None}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    # -- backend hooks ----------------------------------------------------------------------------
    def _save_backend(self, directory: Path) -> None:
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`; special tokens are written out unless `skip_special`."""
        raise NotImplementedError

    def id_to_token(self, id: int) -> str | None:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def token_bytes(self, id: int) -> bytes:
        """Raw bytes of one token (a sentencepiece '▁' is a space; special tokens give their text)."""
        raise NotImplementedError

    def _is_special_token(self, token: str) -> bool:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------
    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_id) if self.bos_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_id) if self.eos_id is not None else None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (`<|im_start|>`) become single ids.

        `add_bos=None` follows the model's default, but does not add a second BOS to a text that
        already starts with one (as chat templates that write `bos_token` do); True/False force it.
        """
        ids = self._encode(text)
        if add_bos is None:
            add_bos = self.add_bos and not (ids and ids[0] == self.bos_id)
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    @cached_property
    def _template(self):
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TokenizerError(f"chat template: {message}")

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"invalid chat template: {e}") from None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render `messages` with the model's jinja chat template, as HF's `apply_chat_template` does."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None


class _TokenizersTokenizer(Tokenizer):
    """Backed by a `tokenizers.Tokenizer` (GGUF vocabularies and HF tokenizer.json)."""

    def __init__(self, tok, *, byte_level: bool):
        self.tok, self.byte_level = tok, byte_level
        self._added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL while it works (encode does not: 2.4 s for a 1 MB text, during
        # which a server's event loop could not run); same ids
        return self.tok.encode_batch([text], add_special_tokens=False)[0].ids if text else []

    def _save_backend(self, directory: Path) -> None:
        self.tok.save(str(directory / "tokenizer.json"))

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_token(self, id: int) -> str | None:
        return self.tok.id_to_token(id)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def _is_special_token(self, token: str) -> bool:
        return self.token_to_id(token) in self._added

    def token_bytes(self, id: int) -> bytes:
        if id in self._added:
            return self._added[id].encode()
        piece = self.tok.id_to_token(id)
        if piece is None:
            raise ValueError(f"token id {id} is out of range (vocabulary of {self.vocab_size})")
        if self.byte_level:
            return bytes(_CHAR_TO_BYTE[c] for c in piece) if all(c in _CHAR_TO_BYTE for c in piece) else piece.encode()
        if m := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()


class _SentencePieceTokenizer(Tokenizer):
    """Backed by a `sentencepiece` model; control tokens written in the text are matched first."""

    def __init__(self, sp):
        self.sp, self.vocab_size = sp, sp.get_piece_size()
        self._control = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i) and sp.id_to_piece(i)}
        names = sorted(self._control, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def _save_backend(self, directory: Path) -> None:
        (directory / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())

    def _encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.sp.encode(text) if text else []
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._control[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        out, run = [], []
        for i in map(int, ids):
            if self.sp.is_control(i):
                out.append(self.sp.decode(run))
                run = []
                if not skip_special:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def id_to_token(self, id: int) -> str | None:
        return self.sp.id_to_piece(id) if 0 <= id < self.vocab_size else None

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None  # unknown pieces map to unk

    def _is_special_token(self, token: str) -> bool:
        return self.token_to_id(token) is not None

    def token_bytes(self, id: int) -> bytes:
        if not 0 <= id < self.vocab_size:
            raise ValueError(f"token id {id} is out of range (vocabulary of {self.vocab_size})")
        piece = self.sp.id_to_piece(id)
        if self.sp.is_byte(id):
            return bytes([int(_BYTE_PIECE.fullmatch(piece).group(1), 16)])
        return piece.replace("\u2581", " ").encode()


# -- GGUF -----------------------------------------------------------------------------------------

def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicate spelling keeps its first id
    if len(vocab) != len(tokens):
        log.debug("GGUF vocabulary has %d duplicate token spellings", len(tokens) - len(vocab))
    return vocab


def _add_gguf_specials(tok, tokens: list[str], types: list[int]) -> None:
    """Control/unknown tokens become special added tokens, user-defined ones plain added tokens,
    so both are matched whole in the text (their ids are already in the model's vocabulary)."""
    from tokenizers import AddedToken

    special = [AddedToken(t, special=True, normalized=False)
               for t, k in zip(tokens, types) if t and k in (_UNKNOWN, _CONTROL)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if t and k == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)


def _gguf_byte_level(meta: dict[str, Any], tokens: list[str], types: list[int]):
    """`tokenizer.ggml.model == "gpt2"`: byte-level BPE with the pre-tokenizer `tokenizer.ggml.pre` names."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    pre = meta.get("tokenizer.ggml.pre", "default")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = HFTokenizer(models.BPE(_vocab(tokens), merges, ignore_merges=pre in _PRE_LLAMA3))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_DIGITS_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _PRE_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in _PRE_GPT2:
            log.warning("unknown GGUF pre-tokenizer %r: splitting text with the GPT-2 regex", pre)
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    _add_gguf_specials(tok, tokens, types)
    return tok


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a normal piece into two
    pieces, best-scoring result first (sentencepiece merges the pair whose result scores highest)."""
    normal = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == _NORMAL}
    merges = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-scores[i], i, cut, left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _gguf_sentencepiece(meta: dict[str, Any], tokens: list[str], types: list[int]):
    """`tokenizer.ggml.model == "llama"`: sentencepiece BPE with byte fallback, as llama.cpp runs it
    (a space is prefixed to the text and to each stretch after a special token)."""
    from tokenizers import decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    # Some converters store pieces made only of spaces with real spaces; sentencepiece spells them '▁'.
    tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if unk is None:
        unk = next((i for i, k in enumerate(types) if k == _UNKNOWN), None)
    model = models.BPE(_vocab(tokens), _spm_merges(tokens, scores, types), fuse_unk=True,
                       unk_token=tokens[unk] if unk is not None else None, byte_fallback="<0x00>" in tokens)
    tok = HFTokenizer(model)
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    replace = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prefix else replace
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    _add_gguf_specials(tok, tokens, types)
    return tok


def _load_gguf(path: Path, meta: dict | None = None) -> Tokenizer:
    from fmstack.checkpoints.gguf import read_gguf_metadata

    try:
        meta = read_gguf_metadata(path) if meta is None else meta
    except FmstackError as e:
        raise TokenizerError(str(e)) from None
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise TokenizerError(f"{path}: the GGUF file has no tokenizer (no tokenizer.ggml.model/tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if kind == "gpt2":
        tok, default_bos = _gguf_byte_level(meta, tokens, types), False
    elif kind == "llama":
        tok, default_bos = _gguf_sentencepiece(meta, tokens, types), True
    else:
        raise TokenizerError(f"{path}: unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2', 'llama')")
    return _TokenizersTokenizer(tok, byte_level=kind == "gpt2").configure(
        bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_id=meta.get("tokenizer.ggml.padding_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
        chat_template=meta.get("tokenizer.chat_template"))


# -- HF directories -------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: unreadable JSON ({e})") from None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(d: Path, config: dict) -> str | None:
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template") or _read_json(d / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _ids(value: Any) -> list[int]:
    return [value] if isinstance(value, int) else [v for v in value or () if isinstance(v, int)]


def _hf_config(d: Path) -> dict[str, Any]:
    """Special tokens, add_bos_token and chat template from the files beside a tokenizer."""
    config = _read_json(d / "tokenizer_config.json")
    special = _read_json(d / "special_tokens_map.json")
    model = _read_json(d / "config.json")
    gen = _read_json(d / "generation_config.json")
    out = {name: _token_text(config.get(name) or special.get(name)) for name in ("bos_token", "eos_token", "pad_token")}
    out.update(add_bos=config.get("add_bos_token"), chat_template=_chat_template(d, config),
               bos_id=model.get("bos_token_id"),
               eos_ids=_ids(gen.get("eos_token_id")) + _ids(model.get("eos_token_id")))
    return out


def _post_processor_adds_bos(spec: Any) -> bool:
    """Whether a tokenizer.json post-processor starts a single sequence with a special token."""
    if not isinstance(spec, dict):
        return False
    if spec.get("type") == "Sequence":
        return any(_post_processor_adds_bos(p) for p in spec.get("processors", []))
    if spec.get("type") == "TemplateProcessing":
        single = spec.get("single") or []
        return bool(single) and "SpecialToken" in single[0]
    return False


def _configure_hf(tok: Tokenizer, cfg: dict[str, Any], add_bos: bool, defaults: dict[str, int | None]) -> Tokenizer:
    """Special ids from the token spellings in `cfg`, else config.json ids, else `defaults`."""
    ids = {f"{n}_id": tok.token_to_id(cfg[f"{n}_token"]) if cfg[f"{n}_token"] else None for n in ("bos", "eos", "pad")}
    fallback = {"bos_id": cfg["bos_id"], "eos_id": (cfg["eos_ids"] or [None])[0]}
    for name, value in ids.items():
        if value is None:
            ids[name] = fallback.get(name) if isinstance(fallback.get(name), int) else defaults.get(name)
    return tok.configure(**ids, add_bos=add_bos, chat_template=cfg["chat_template"], extra_eos=cfg["eos_ids"])


def _load_tokenizer_json(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{path}: cannot load tokenizer.json ({e})") from None
    spec = json.loads(backend.to_str())
    cfg = _hf_config(path.parent)
    add_bos = cfg["add_bos"]
    if not isinstance(add_bos, bool):
        add_bos = _post_processor_adds_bos(spec.get("post_processor"))
    byte_level = "ByteLevel" in json.dumps([spec.get("decoder"), spec.get("pre_tokenizer")])
    return _configure_hf(_TokenizersTokenizer(backend, byte_level=byte_level), cfg, add_bos, {})


def _load_sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from None
    cfg = _hf_config(path.parent)
    add_bos = cfg["add_bos"] if isinstance(cfg["add_bos"], bool) else True
    defaults = {"bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id()}
    return _configure_hf(_SentencePieceTokenizer(sp), cfg, add_bos, {k: v for k, v in defaults.items() if v >= 0})


def load_tokenizer(source: str | Path, gguf_metadata: dict | None = None) -> Tokenizer:
    """The tokenizer in `source`: a .gguf file, a tokenizer.json / tokenizer.model file, or a
    directory holding one of them (tokenizer.json is preferred). `gguf_metadata`: the GGUF's fields
    already read (saves parsing the vocabulary twice)."""
    path = Path(source)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise TokenizerError(f"{source}: no tokenizer found (expected tokenizer.json or tokenizer.model)")
    if not path.is_file():
        raise TokenizerError(f"{source}: no such file or directory")
    if path.suffix.lower() == ".gguf":
        tok = _load_gguf(path, gguf_metadata)
    elif path.suffix.lower() == ".json":
        tok = _load_tokenizer_json(path)
    elif path.suffix.lower() == ".model":
        tok = _load_sentencepiece(path)
    else:
        raise TokenizerError(f"{source}: not a tokenizer file (expected .gguf, tokenizer.json or tokenizer.model)")
    log.debug("loaded tokenizer from %s: vocab %d, bos %s, eos %s, add_bos %s", path, tok.vocab_size,
              tok.bos_id, sorted(tok.eos_ids), tok.add_bos)
    return tok
