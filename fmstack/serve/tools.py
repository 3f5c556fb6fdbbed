"""Tool calling for /v1/chat/completions: the tools go to the model through its chat template
(HF templates take `tools=`), and the model's text comes back as OpenAI `tool_calls`.

The output format depends on the model family, so the parser is chosen from the template: Hermes
(Qwen2.5, Hermes, SmolLM3 and most tool templates) writes `<tool_call>{"name", "arguments"}</tool_call>`,
Llama 3.x writes a bare JSON object `{"name", "parameters"}` (after `<|python_tag|>` when it
uses a built-in tool). `tool_choice` "required" or a named function is enforced, not hoped for: the
output is constrained (structured.py) to a JSON object `{"name": ..., "arguments": {...}}` whose
arguments follow the function's `parameters` schema, and that object is the call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from fmstack.errors import ParameterError

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_RE = re.compile(re.escape(HERMES_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(HERMES_CLOSE) + r"|$)", re.S)
PYTHON_TAG = "<|python_tag|>"


def template_supports_tools(template: str | None) -> bool:
    """Whether a chat template renders a `tools` list (it reads the variable)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def parser_for(template: str | None) -> str:
    """'llama3_json' for Llama 3.x templates (they know `<|python_tag|>` / ipython), else 'hermes'."""
    return "llama3_json" if template and (PYTHON_TAG in template or "ipython" in template) else "hermes"


def _tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def call_schema(tools: list[dict], name: str | None) -> dict:
    """JSON schema of one call to `name` (or to any of `tools` when None): {"name", "arguments"}."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise ParameterError(f"no tool named {name!r}; tools are {_tool_names(tools)}")
    alternatives = [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        "arguments": t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


def _json_object(text: str) -> dict | None:
    """`text` parsed as a JSON object, or None when it is not one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


_ARG_KEYS = ("arguments", "parameters")  # Hermes/OpenAI write "arguments", Llama 3.x "parameters"


@dataclass
class _Scan:
    """What a (possibly unfinished) call object `{"name": ..., "arguments": {...}}` holds so far:
    the name once its string is complete, where the arguments value starts and (once complete)
    ends, and where the object ends."""

    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    end: int | None = None


def _scan_call(text: str, start: int) -> _Scan:
    """Scan the JSON object starting at text[start] == "{" as far as the text goes."""
    res, depth, in_str, esc = _Scan(), 0, False, False
    key, want_key, val, str_at = None, True, None, -1  # the current top-level key, where its value starts
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc or ch == "\\":
                esc = not esc
            elif ch == '"':
                in_str = False
                if depth == 1 and want_key:
                    key, want_key = _loads(text[str_at:i + 1]), False
                elif depth == 1 and val == str_at:
                    _value(res, key, text, val, i + 1)
                    val = None
            continue
        if depth == 1 and not want_key and val is None and ch not in " \t\r\n:,}]":
            val = i
            if key in _ARG_KEYS:
                res.args_start = i
        if ch == '"':
            in_str, str_at = True, i
        elif ch in "{[":
            depth += 1
        elif ch in "}]" or (ch == "," and depth == 1):
            if depth == 1 and val is not None:  # a scalar value ends here
                _value(res, key, text, val, i)
                val = None
            depth -= ch != ","
            if depth == 1 and val is not None and text[val] in "{[":
                _value(res, key, text, val, i + 1)
                val = None
            want_key = want_key or (ch == "," and depth == 1)
            if depth == 0:
                res.end = i + 1
                return res
    return res


def _loads(literal: str):
    try:
        return json.loads(literal)
    except ValueError:
        return None


def _value(res: _Scan, key, text: str, start: int, end: int) -> None:
    """A complete top-level value text[start:end] of `key`."""
    if key == "name":
        res.name = _loads(text[start:end].strip())
    elif key in _ARG_KEYS:
        res.args_start, res.args_end = start, len(text[:end].rstrip())


def _call_spans(text: str, parser: str) -> list[tuple[int, int]]:
    """(start, limit) of each call object as far as the text shows: it starts at text[start] == "{"
    and lies before `limit` (a Hermes call ends at its closing tag); start -1 for a call that does
    not start with "{" (malformed)."""
    if parser == "hermes":
        at, spans = text.find(HERMES_OPEN), []
        while at != -1:
            body = at + len(HERMES_OPEN)
            j = body + len(text[body:]) - len(text[body:].lstrip())
            close = text.find(HERMES_CLOSE, body)
            if j < len(text):
                spans.append((j if text[j] == "{" else -1, close if close != -1 else len(text)))
            at = text.find(HERMES_OPEN, body)
        return spans
    stripped = text.lstrip()
    j = len(text) - len(stripped)
    if parser == "llama3_json" and stripped.startswith(PYTHON_TAG):
        after = stripped[len(PYTHON_TAG):]
        j += len(PYTHON_TAG) + len(after) - len(after.lstrip())
    spans = []
    while j < len(text):
        if text[j] != "{":
            return spans + [(-1, len(text))]
        spans.append((j, len(text)))
        end = _scan_call(text, j).end
        rest = text[end:].lstrip() if end is not None else ""
        if end is None or not rest or parser == "forced":
            return spans + ([(-1, len(text))] if rest else [])
        if not rest.startswith(";"):
            return spans + [(-1, len(text))]
        j = len(text) - len(rest[1:].lstrip())
    return spans


def _scans(text: str, parser: str) -> list[_Scan]:
    return [_scan_call(text[:limit], start) if start >= 0 else _Scan() for start, limit in _call_spans(text, parser)]


def _arguments(text: str, scan: _Scan) -> str | None:
    """The call's arguments as OpenAI sends them (JSON object text), or None when not (yet) one.
    An object is sent as the model wrote it; one written as a JSON string is decoded."""
    if scan.args_start is None or scan.args_end is None:
        return None
    raw = text[scan.args_start:scan.args_end]
    value = _loads(raw)
    if isinstance(value, str):
        raw, value = value, _json_object(value)
    return raw if isinstance(value, dict) else None


def _new_call(name: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": ""}}


def parse_tool_calls(text: str, parser: str) -> tuple[str | None, list[dict]]:
    """The model's whole text -> (content, OpenAI tool_calls). Text that is not made of well-formed
    calls stays content, all of it."""
    content, calls, _ = ToolOutput(parser).finish(text)
    return content, calls


def _held_tail(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ToolOutput:
    """Per-choice tool state while the text grows: the content to stream now, and the calls streamed
    as OpenAI deltas (first `id`/`type`/`function.name`, then `function.arguments` fragments as the
    model writes them). parser: hermes | llama3_json | forced (the whole output is one call)."""

    parser: str
    sent: int = 0  # characters of content already streamed
    calls: list[dict] = field(default_factory=list)  # one per call whose name is known
    args_sent: list[int] = field(default_factory=list)  # characters of each call's arguments streamed

    def visible(self, text: str) -> str:
        """New content to stream for the text so far: nothing that is or may become a call."""
        if self.parser == "forced" or (self.parser == "llama3_json" and text.lstrip()[:1] in ("{", "<")):
            return ""
        end = len(text) - _held_tail(text, HERMES_OPEN) if self.parser == "hermes" else len(text)
        at = text.find(HERMES_OPEN) if self.parser == "hermes" else -1
        end = at if at != -1 else end
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        return delta

    def update(self, text: str) -> tuple[str, list[dict]]:
        """(new content, new tool_call deltas) for the text so far."""
        content, deltas = self.visible(text), []
        for i, scan in enumerate(_scans(text, self.parser)):
            if i == len(self.calls):
                if not isinstance(scan.name, str) or not scan.name:
                    break  # calls are announced in order, once their name is known
                self.calls.append(_new_call(scan.name))
                self.args_sent.append(0)
                deltas.append({"index": i, **_new_call(scan.name), "id": self.calls[i]["id"]})  # a copy
            fragment = self._fragment(text, scan, i)
            if fragment:
                self.calls[i]["function"]["arguments"] += fragment
                deltas.append({"index": i, "function": {"arguments": fragment}})
        return content, deltas

    def _fragment(self, text: str, scan: _Scan, i: int) -> str:
        """What to send now of call i's arguments: an object's text as it grows; one written as a
        JSON string once it is complete (decoded)."""
        if scan.args_start is None or (text[scan.args_start] not in "{[" and scan.args_end is None):
            return ""
        if text[scan.args_start] in "{[":
            whole = text[scan.args_start:scan.args_end if scan.args_end is not None else len(text)]
        else:
            whole = _arguments(text, scan) or ""
        fragment = whole[self.args_sent[i]:]
        self.args_sent[i] = len(whole)
        return fragment

    def finish(self, text: str) -> tuple[str | None, list[dict], str]:
        """(content, tool_calls, unsent content) of the whole text. The calls stand only when every
        one is a complete object with a name and object arguments, and nothing but whitespace or `;`
        (Llama) follows; otherwise none do and the whole text is content. Catches up with `text` first
        (a stream has already: `update` ran on the same text)."""
        self.update(text)
        scans = _scans(text, self.parser)
        ok = bool(scans) and len(scans) == len(self.calls) and all(
            sc.end is not None and sc.name == c["function"]["name"] and _arguments(text, sc) is not None
            and _arguments(text, sc) == c["function"]["arguments"] for sc, c in zip(scans, self.calls))
        if self.parser == "hermes" and ok:
            content = text[:text.find(HERMES_OPEN)].strip()
            return content or None, self.calls, ""
        if ok:
            return None, self.calls, ""
        self.calls = []
        return text, [], text[self.sent:]


def check_tools(v: Any) -> list[dict]:
    """Validate OpenAI `tools`; ParameterError naming the item otherwise."""
    if not isinstance(v, list) or not v:
        raise ParameterError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    names = set()
    for i, t in enumerate(v):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}",
                                                                                              f["name"]):
            raise ParameterError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": "
                                 "a-z, A-Z, 0-9, _ . - (at most 64), \"parameters\": {...}}}}}")
        if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
            raise ParameterError(f"tools[{i}].function.parameters must be a JSON schema object")
        if f["name"] in names:
            raise ParameterError(f"tools[{i}].function.name {f['name']!r} is used twice")
        names.add(f["name"])
    return v


def check_tool_choice(v: Any, tools: list[dict] | None) -> str | dict:
    """'none' | 'auto' | 'required' | the named function's name as {"name": ...}."""
    if v is None:
        return "auto" if tools else "none"
    if not tools and v != "none":
        raise ParameterError("tool_choice needs tools")
    if v in ("none", "auto", "required"):
        return v
    name = v.get("function", {}).get("name") if isinstance(v, dict) and v.get("type") == "function" else None
    if not isinstance(name, str):
        raise ParameterError('tool_choice must be "none", "auto", "required" or '
                             '{"type": "function", "function": {"name": ...}}')
    if name not in _tool_names(tools):
        raise ParameterError(f"tool_choice names {name!r}, which is not among tools {_tool_names(tools)}")
    return {"name": name}
