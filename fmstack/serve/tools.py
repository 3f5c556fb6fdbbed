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


def _call(name: Any, args: Any) -> dict | None:
    if not isinstance(name, str) or not name:
        return None
    if isinstance(args, str):  # some models write the arguments as a JSON string
        args = _json_object(args)
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _from_json(text: str) -> dict | None:
    obj = _json_object(text)
    if obj is None:
        return None
    return _call(obj.get("name"), obj.get("arguments", obj.get("parameters")))


def parse_tool_calls(text: str, parser: str) -> tuple[str | None, list[dict]]:
    """The model's text -> (content, OpenAI tool_calls). Text that is no well-formed call stays content."""
    if parser == "forced":
        call = _from_json(text.strip())
        return (None, [call]) if call else (text, [])
    if parser == "llama3_json":
        body = text.strip().removeprefix(PYTHON_TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls = [_from_json(part) for part in body.split(";")]
        return (None, calls) if calls and all(calls) else (text, [])
    at = text.find(HERMES_OPEN)
    if at == -1:
        return text, []
    calls = [c for c in (_from_json(m.group(1)) for m in _HERMES_RE.finditer(text, at)) if c]
    if not calls:
        return text, []
    content = text[:at].strip()
    return content or None, calls


def _held_tail(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ToolOutput:
    """Per-choice tool state: what to stream as content now, and the calls at the end.
    parser: hermes | llama3_json | forced (the whole output is one call)."""

    parser: str
    sent: int = 0  # characters of content already streamed
    calls: list[dict] = field(default_factory=list)

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

    def finish(self, text: str) -> tuple[str | None, list[dict], str]:
        """(content, tool_calls, unsent content) of the whole text."""
        content, self.calls = parse_tool_calls(text, self.parser)
        rest = "" if self.calls else text[self.sent:]
        return content, self.calls, rest


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
