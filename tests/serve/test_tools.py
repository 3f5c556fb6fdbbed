"""Tool calls streamed as OpenAI deltas (no model: the chat accumulator fed text pieces): a call's id,
type and name come first, then its arguments in fragments as they are generated; the fragments
assemble to the very call of the non-streamed answer; a call that does not parse at the end falls
back to content with finish_reason "stop"/"length", never "tool_calls"."""

from __future__ import annotations

import json

import pytest

from fmstack.serve.engine import RequestOutput
from fmstack.serve.http.responses import ChatChoice, TokenText
from fmstack.serve.tools import ToolOutput, parse_tool_calls

HERMES = ('I will look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "note": "a } \\" {"}}'
          '\n</tool_call>\n<tool_call>{"arguments": "{\\"tz\\": \\"UTC\\"}", "name": "get_time"}</tool_call>')
LLAMA = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "days": [1, 2]}}; {"name": "f", "parameters": {}}'
FORCED = '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}'


def feed(parser: str, text: str, piece: int, finish: str = "stop") -> tuple[list[dict], dict]:
    """Stream `text` in pieces of `piece` characters through a ChatChoice: (its deltas, its answer)."""
    acc = ChatChoice(TokenText(None), False, 0, tools=ToolOutput(parser))
    deltas = []
    for at in range(0, len(text), piece):
        last = at + piece >= len(text)
        out = RequestOutput("r", [], text[at:at + piece], None, None, last, finish if last else None, 5, 1)
        deltas += acc.add(out)
    return deltas, acc.choice()


def assemble(deltas: list[dict]) -> tuple[str, dict[int, dict]]:
    """What a client builds from the deltas: the content and each call (id, name, arguments)."""
    content, calls = "", {}
    for d in deltas:
        content += d["delta"].get("content") or ""
        for tc in d["delta"].get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"id": None, "type": None, "name": "", "arguments": ""})
            if "id" in tc:
                assert call["id"] is None, "a call's id/name delta comes once"
                call.update(id=tc["id"], type=tc["type"], name=tc["function"]["name"])
            assert call["id"] is not None, "arguments before the call's name"
            call["arguments"] += tc["function"].get("arguments", "")
    return content, calls


@pytest.mark.parametrize("parser,text", [("hermes", HERMES), ("llama3_json", LLAMA), ("forced", FORCED)])
@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_streamed_calls_assemble_to_the_non_streamed_calls(parser, text, piece):
    deltas, answer = feed(parser, text, piece)
    content, calls = assemble(deltas)
    message = answer["message"]
    assert answer["finish_reason"] == "tool_calls" and deltas[-1]["finish_reason"] == "tool_calls"
    expected = [{"id": c["id"], "type": "function", "name": c["function"]["name"],
                 "arguments": c["function"]["arguments"]} for c in message["tool_calls"]]
    assert [calls[i] for i in sorted(calls)] == expected
    assert all(isinstance(json.loads(c["arguments"]), dict) for c in expected)
    assert content.strip() == (message["content"] or "")
    n_fragments = sum(1 for d in deltas for tc in d["delta"].get("tool_calls", []) if "id" not in tc)
    if piece == 1:  # generated piece by piece: the arguments come in many fragments, not at the end
        assert n_fragments > 10


def test_each_parser_finds_the_calls():
    content, calls = parse_tool_calls(HERMES, "hermes")
    assert content == "I will look." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "note": 'a } " {'}
    assert calls[1]["function"]["arguments"] == '{"tz": "UTC"}'  # written as a JSON string: decoded
    content, calls = parse_tool_calls(LLAMA, "llama3_json")
    assert content is None and [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": "Oslo", "days": [1, 2]}, {}]


@pytest.mark.parametrize("parser,text,finish", [
    ("hermes", 'Sure.<tool_call>{"name": "get_weather", "arguments": {"city": "Par', "length"),  # cut by max_tokens
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>', "stop"),  # arguments not an object
    ("llama3_json", '{"name": "f", "parameters": {}} and then some prose', "stop"),
    ("hermes", '<tool_call>{"name": "f" "arguments": {}}</tool_call>', "stop")])  # malformed JSON
def test_a_call_that_does_not_parse_falls_back_to_content(parser, text, finish):
    deltas, answer = feed(parser, text, 2, finish)
    content, _ = assemble(deltas)
    assert content == text  # everything held back comes as content at the end
    assert answer["message"]["content"] == text and "tool_calls" not in answer["message"]
    assert answer["finish_reason"] == finish == deltas[-1]["finish_reason"]


def test_plain_content_streams_as_it_comes():
    deltas, answer = feed("hermes", "Hello there, a < b.", 2)
    assert [d["delta"].get("content") for d in deltas[:3]] == ["He", "ll", "o "]
    assert answer["finish_reason"] == "stop" and answer["message"]["content"] == "Hello there, a < b."
