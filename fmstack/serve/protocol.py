"""OpenAI request validation and error shapes (no HTTP framework here).

Every request field is checked by hand so that each mistake gets a 400 naming the field and what
is allowed, in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`; unknown
fields are rejected, as OpenAI does. Bounds are enforced here, where the body is parsed, so nothing
out of range reaches tokenization, sampling or the engine: integers are at most 64-bit (a JSON
integer of thousands of digits is refused by `json.loads` itself and answered 400), numbers are
finite, `top_k` is at most the vocabulary, `top_p` at least MIN_TOP_P (smaller values round to 0 in
float32, where no token survives), presence/frequency penalties in [-2, 2], `repetition_penalty` > 0,
`min_p` in [0, 1], `logit_bias` at most 300 token ids below the vocabulary with biases in [-100, 100],
`n` choices per prompt with at most MAX_CHOICES choices per request, and every string must be encodable as UTF-8 (a lone surrogate
such as "\\ud800" is valid JSON but no text; it is refused with the field's path). Messages quote
client values with `ascii()`, so an error body never carries text that cannot be encoded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from fmstack.errors import ParameterError
from fmstack.generation.sampling import LOGIT_BIAS_RANGE, MAX_LOGIT_BIAS, PENALTY_RANGE, SamplingParams
from fmstack.generation.structured import parse_response_format
from fmstack.serve.engine import MAX_LOGPROBS
from fmstack.serve.tools import check_tool_choice, check_tools

MAX_STOP = 16
MAX_PROMPTS = 64
MAX_CHOICES = 64  # n x the number of prompts, per request
MAX_INT = 2**63 - 1  # integer fields (max_tokens, ...) are signed 64-bit
MIN_TOP_P = 1e-6  # float32(top_p) stays > 0 (values below ~1e-45 round to 0 and drop every token)
SEED_RANGE = (-2**63, 2**64)  # a seed is any signed or unsigned 64-bit integer; folded to [0, 2**63)


class APIError(Exception):
    """An error answered as OpenAI does: HTTP `status` with the JSON `body()`."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             413: "invalid_request_error", 429: "rate_limit_error",
                             503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def parse_json_body(raw: bytes) -> dict:
    """The JSON object of a request body, every string in it (keys included) encodable as UTF-8."""
    if not raw.strip():
        raise APIError(400, "the request body is empty: send a JSON object")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and integers past the int-digit limit
        raise APIError(400, f"the request body is not valid JSON ({ascii(str(e))[1:-1][:200]})") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    check_text(body)
    return body


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: Any, path: str = "") -> None:
    """400 naming the first string (value or key) in `value` that is not valid Unicode text (a lone
    surrogate). Iterative, so any depth json.loads accepted is fine."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and not _encodable(v):
                raise bad(where[:100] or "body", "contains a lone surrogate (e.g. \\ud800), which is not text: "
                                           "send valid UTF-8 strings")
        elif isinstance(v, dict):
            for k, item in v.items():
                name = f"{where}.{k}" if where else k
                if not k.isascii() and not _encodable(k):
                    raise bad(ascii(name)[1:101], "a key contains a lone surrogate, which is not text")
                stack.append((name, item))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(v))


# -- field checks ------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    """A finite JSON number that fits a float (a huge integer would overflow float() and isfinite)."""
    if _is_int(v):
        return -MAX_INT - 1 <= v <= MAX_INT
    return isinstance(v, float) and math.isfinite(v)


def show(v: Any) -> str:
    """A client value for an error message: ASCII only, at most 60 characters."""
    text = ascii(v)
    return text if len(text) <= 60 else text[:57] + "..."


def int_in(name: str, v: Any, lo: int, hi: int = MAX_INT) -> int:
    if not _is_int(v) or v < lo or v > hi:
        allowed = f"an integer >= {lo}" if hi == MAX_INT else f"an integer in [{lo}, {hi}]"
        raise bad(name, f"{show(v)} is invalid: must be {allowed}")
    return v


def num_in(name: str, v: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    if not _is_num(v) or v < lo or v > hi or (lo_open and v == lo):
        raise bad(name, f"{show(v)} is invalid: must be a number in {'(' if lo_open else '['}{lo}, {hi}]")
    return float(v)


def boolean(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise bad(name, f"{show(v)} is invalid: must be true or false")
    return v


def stop_list(name: str, v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or len(items) > MAX_STOP or not all(isinstance(s, str) and s for s in items):
        raise bad(name, f"must be a non-empty string or a list of at most {MAX_STOP} non-empty strings")
    return tuple(items)


def token_list(name: str, v: Any, vocab: int) -> list[int]:
    if not v:
        raise bad(name, "is empty: a prompt needs at least one token")
    for t in v:
        if not _is_int(t) or not 0 <= t < vocab:
            raise bad(name, f"token id {show(t)} is invalid: token ids are integers in [0, {vocab})")
    return list(v)


@dataclass
class Common:
    """Fields shared by both endpoints, validated."""

    model: str | None
    max_tokens: int | None
    sampling: dict = field(default_factory=dict)  # SamplingParams kwargs except max_new_tokens
    stream: bool = False
    include_usage: bool = False
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    constraint: tuple[str, Any] | None = None  # (kind, value) for structured.compile_constraint

    def sampling_params(self, max_tokens: int, choice: int = 0) -> SamplingParams:
        """The params of choice `choice` of a prompt: a seeded request's choices get seeds seed + choice
        (mod 2**63), so they differ when sampling and each is reproducible."""
        s = dict(self.sampling)
        if choice and s.get("seed") is not None:
            s["seed"] = (s["seed"] + choice) % 2**63
        return SamplingParams(max_new_tokens=max_tokens, **s)


def _one_only(name: str, v: Any) -> None:
    if v is not None and v != 1 or isinstance(v, bool):
        raise bad(name, f"{show(v)} is not supported: this server returns one choice per prompt (use 1)")


def _common(body: dict, allowed_extra: set[str], vocab: int) -> Common:
    known = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "stream_options",
             "n", "user", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "ignore_eos",
             "stop_token_ids", "min_tokens", "min_p", "response_format", "guided_regex", "guided_choice"} | allowed_extra
    for key in body:
        if key not in known:
            raise APIError(400, f"Unrecognized request argument supplied: {ascii(key)[1:-1]}", param=key)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"{show(model)} is invalid: must be a string")
    mt = body.get("max_tokens")
    if mt is not None:
        int_in("max_tokens", mt, 0)
    s: dict[str, Any] = {}
    if body.get("temperature") is not None:
        s["temperature"] = num_in("temperature", body["temperature"], 0.0, 2.0)
    if body.get("top_p") is not None:
        s["top_p"] = num_in("top_p", body["top_p"], MIN_TOP_P, 1.0)
    if body.get("top_k") is not None:
        k = body["top_k"]
        if not _is_int(k) or not -1 <= k <= vocab:
            raise bad("top_k", f"{show(k)} is invalid: must be an integer in [-1, {vocab}] (the vocabulary size; "
                               "-1 or 0 disable top-k)")
        s["top_k"] = max(k, 0)
    s["stop"] = stop_list("stop", body.get("stop"))
    if body.get("seed") is not None:
        seed = body["seed"]
        if not _is_int(seed) or not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
            raise bad("seed", f"{show(seed)} is invalid: must be a 64-bit integer in [-2**63, 2**64)")
        s["seed"] = seed % 2**63
    if body.get("ignore_eos") is not None:
        s["ignore_eos"] = boolean("ignore_eos", body["ignore_eos"])
    stream = boolean("stream", body["stream"]) if body.get("stream") is not None else False
    include_usage = False
    so = body.get("stream_options")
    if so is not None:
        if not stream:
            raise bad("stream_options", "is only allowed when stream is true")
        if not isinstance(so, dict) or set(so) - {"include_usage", "continuous_usage_stats"}:
            raise bad("stream_options", 'must be an object like {"include_usage": true}')
        include_usage = boolean("stream_options.include_usage", so.get("include_usage", False))
    n = int_in("n", body["n"], 1, MAX_CHOICES) if body.get("n") is not None else 1
    s.update(_logit_processing(body, vocab))
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", "must be a string")
    stop_ids: tuple[int, ...] = ()
    if body.get("stop_token_ids") is not None:
        v = body["stop_token_ids"]
        if not isinstance(v, list) or not all(_is_int(t) and 0 <= t < vocab for t in v):
            raise bad("stop_token_ids", f"must be a list of token ids in [0, {vocab})")
        stop_ids = tuple(v)
    return Common(model, mt, s, stream, include_usage, stop_ids, n, _constraint(body))


def _logit_processing(body: dict, vocab: int) -> dict[str, Any]:
    """The penalty, min_p, min_tokens and logit_bias fields as SamplingParams kwargs (absent: left out)."""
    s: dict[str, Any] = {}
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) is not None:
            s[name] = num_in(name, body[name], *PENALTY_RANGE)
    rp = body.get("repetition_penalty")
    if rp is not None:
        if not _is_num(rp) or rp <= 0:
            raise bad("repetition_penalty", f"{show(rp)} is invalid: must be a number > 0 (1 disables it)")
        s["repetition_penalty"] = float(rp)
    if body.get("min_p") is not None:
        s["min_p"] = num_in("min_p", body["min_p"], 0.0, 1.0)
    if body.get("min_tokens") is not None:
        s["min_tokens"] = int_in("min_tokens", body["min_tokens"], 0)
    if body.get("logit_bias") is not None:
        s["logit_bias"] = logit_bias(body["logit_bias"], vocab)
    return s


def logit_bias(v: Any, vocab: int) -> tuple[tuple[int, float], ...]:
    """{"token id": bias} -> sorted (id, bias) pairs; ids in [0, vocab), biases in [-100, 100]."""
    if not isinstance(v, dict):
        raise bad("logit_bias", 'must be an object mapping token ids to biases, like {"50256": -100}')
    if len(v) > MAX_LOGIT_BIAS:
        raise bad("logit_bias", f"has {len(v)} entries; at most {MAX_LOGIT_BIAS} are allowed")
    pairs = []
    for key, bias in v.items():
        if not (key.isascii() and key.isdigit() and (key == "0" or not key.startswith("0"))) or int(key) >= vocab:
            raise bad("logit_bias", f"key {show(key)} is invalid: keys are token ids in [0, {vocab}) as decimal strings")
        if not _is_num(bias) or not LOGIT_BIAS_RANGE[0] <= bias <= LOGIT_BIAS_RANGE[1]:
            raise bad("logit_bias", f"bias {show(bias)} for token {key} is invalid: must be a number in [-100, 100]")
        pairs.append((int(key), float(bias)))
    return tuple(sorted(pairs))


def _constraint(body: dict) -> tuple[str, Any] | None:
    """response_format / guided_regex / guided_choice (vLLM's names) -> (kind, value); at most one."""
    given = [k for k in ("response_format", "guided_regex", "guided_choice") if body.get(k) is not None]
    if len(given) > 1:
        raise bad(given[1], f"cannot be combined with {given[0]}: send one output constraint")
    if not given:
        return None
    if given[0] == "guided_regex":
        if not isinstance(body["guided_regex"], str) or not body["guided_regex"]:
            raise bad("guided_regex", "must be a non-empty regular expression string")
        return ("regex", body["guided_regex"])
    if given[0] == "guided_choice":
        v = body["guided_choice"]
        if not isinstance(v, list) or not v or not all(isinstance(c, str) and c for c in v):
            raise bad("guided_choice", "must be a non-empty list of non-empty strings")
        return ("choice", v)
    try:
        return parse_response_format(body["response_format"])
    except ParameterError as e:
        raise bad("response_format", str(e)) from None


@dataclass
class CompletionRequest:
    common: Common
    prompts: list[str | list[int]]  # each a text or token ids
    logprobs: int | None
    echo: bool


def parse_completion(body: dict, vocab: int) -> CompletionRequest:
    common = _common(body, {"prompt", "logprobs", "echo", "best_of", "suffix"}, vocab)
    if "prompt" not in body:
        raise bad("prompt", "is required (a string, a list of strings, a list of token ids, or a list of those)")
    p = body["prompt"]
    if isinstance(p, str):
        prompts: list = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = list(p)
    elif isinstance(p, list) and p and all(_is_int(x) for x in p):
        prompts = [token_list("prompt", p, vocab)]
    elif isinstance(p, list) and p and all(isinstance(x, list) for x in p):
        prompts = [token_list(f"prompt[{i}]", x, vocab) for i, x in enumerate(p)]
    else:
        raise bad("prompt", "must be a string, a non-empty list of strings, a list of token ids, or a list of "
                            "token-id lists")
    if len(prompts) > MAX_PROMPTS:
        raise bad("prompt", f"has {len(prompts)} prompts; at most {MAX_PROMPTS} per request")
    if len(prompts) * common.n > MAX_CHOICES:
        raise bad("n", f"{common.n} choices for each of {len(prompts)} prompts is {len(prompts) * common.n}; at "
                       f"most {MAX_CHOICES} choices per request")
    if any(isinstance(x, str) and not x for x in prompts):
        raise bad("prompt", "is an empty string")
    lp = body.get("logprobs")
    if lp is not None:
        int_in("logprobs", lp, 0, MAX_LOGPROBS)
    echo = boolean("echo", body["echo"]) if body.get("echo") is not None else False
    _one_only("best_of", body.get("best_of"))
    if body.get("suffix") is not None:
        raise bad("suffix", "is not supported")
    return CompletionRequest(common, prompts, lp, echo)


@dataclass
class ChatRequest:
    common: Common
    messages: list[dict]
    logprobs: bool
    top_logprobs: int
    tools: list[dict] | None = None
    tool_choice: str | dict = "none"  # none | auto | required | {"name": function}


ROLES = ("system", "user", "assistant", "developer", "tool")


def _message(i: int, m: Any) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(where, "must be an object with 'role' and 'content'")
    extra = set(m) - {"role", "content", "name", "tool_call_id", "tool_calls"}
    if extra:
        raise bad(where, f"unknown key(s) {sorted(extra)}: allowed are role, content, name, tool_call_id, "
                         "tool_calls")
    role = m.get("role")
    if role not in ROLES:
        raise bad(f"{where}.role", f"{show(role)} is invalid: must be one of {', '.join(ROLES)}")
    content = m.get("content")
    calls = _tool_calls(where, m) if role == "assistant" and m.get("tool_calls") is not None else None
    if content is None and calls:
        content = ""
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}]", 'only text parts ({"type": "text", "text": "..."}) are supported')
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise bad(f"{where}.content", "must be a string or a list of text parts")
    out = {"role": "system" if role == "developer" else role, "content": content}
    if isinstance(m.get("name"), str):
        out["name"] = m["name"]
    if calls:
        out["tool_calls"] = calls
    if role == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise bad(f"{where}.tool_call_id", "is required for a tool message: the id of the call it answers")
        out["tool_call_id"] = m["tool_call_id"]
    return out


def _tool_calls(where: str, m: dict) -> list[dict]:
    """An assistant message's tool_calls, arguments parsed to objects (chat templates render those)."""
    calls = m["tool_calls"]
    if not isinstance(calls, list):
        raise bad(f"{where}.tool_calls", "must be a list of calls")
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("arguments"), str):
            raise bad(f"{where}.tool_calls[{j}]", 'must be {"id", "type": "function", "function": {"name": str, '
                                                  '"arguments": a JSON string}}')
        try:
            args = json.loads(f["arguments"])
        except ValueError:
            raise bad(f"{where}.tool_calls[{j}].function.arguments", "is not valid JSON") from None
        out.append({"id": c.get("id"), "type": "function", "function": {"name": f["name"], "arguments": args}})
    return out


def parse_chat(body: dict, vocab: int) -> ChatRequest:
    body = dict(body)
    if "max_completion_tokens" in body:
        mct = body.pop("max_completion_tokens")
        if mct is not None:
            int_in("max_completion_tokens", mct, 0)
            body["max_tokens"] = mct
    common = _common(body, {"messages", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls"},
                     vocab)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "is required: a non-empty list of {role, content} objects")
    messages = [_message(i, m) for i, m in enumerate(msgs)]
    lp = boolean("logprobs", body["logprobs"]) if body.get("logprobs") is not None else False
    tlp = body.get("top_logprobs")
    if tlp is not None:
        int_in("top_logprobs", tlp, 0, MAX_LOGPROBS)
        if not lp:
            raise bad("top_logprobs", "needs logprobs set to true")
    tools, choice = _tools(body)
    if tools and choice != "none" and common.constraint is not None:
        raise bad("tools", "cannot be combined with response_format / guided_*: use tool_choice \"none\" or drop "
                           "the output constraint")
    return ChatRequest(common, messages, lp, tlp or 0, tools, choice)


def _tools(body: dict) -> tuple[list[dict] | None, str | dict]:
    tools = None
    if body.get("tools") is not None:
        try:
            tools = check_tools(body["tools"])
        except ParameterError as e:
            raise bad("tools", str(e)) from None
    if body.get("parallel_tool_calls") is not None:
        boolean("parallel_tool_calls", body["parallel_tool_calls"])
    try:
        return tools, check_tool_choice(body.get("tool_choice"), tools)
    except ParameterError as e:
        raise bad("tool_choice", str(e)) from None

