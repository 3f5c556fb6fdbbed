"""OpenAPI descriptions of the routes' real request and response bodies.

The handlers validate bodies by hand (protocol.py: every mistake a 400 naming the field), so
FastAPI cannot infer these; they are attached with `openapi_extra` / `responses` so that the schema
(`app.openapi()`) describes what the server accepts and answers. The API fuzzing test
(tests/serve/test_fuzz.py) generates requests from it and checks the answers against it.
"""

from __future__ import annotations

from fmstack.serve.engine import MAX_LOGPROBS
from fmstack.generation.sampling import MAX_LOGIT_BIAS
from fmstack.serve.protocol import MAX_CHOICES, MAX_INT, MAX_PROMPTS, MAX_STOP

_INT = {"type": "integer"}
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_STOP = {"anyOf": [{"type": "string", "minLength": 1},
                   {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP},
                   {"type": "null"}]}

_COMMON = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 0, "maximum": MAX_INT},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "stop": _STOP,
    "seed": {"type": "integer", "minimum": -2**63, "maximum": 2**64 - 1},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                       "additionalProperties": False},
    "n": {"type": "integer", "minimum": 1, "maximum": MAX_CHOICES},
    "user": {"type": "string"},
    "ignore_eos": {"type": "boolean"},
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "min_tokens": {"type": "integer", "minimum": 0, "maximum": MAX_INT},
    "logit_bias": {"type": "object", "maxProperties": MAX_LOGIT_BIAS, "propertyNames": {"pattern": "^(0|[1-9][0-9]*)$"},
                   "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
}

COMPLETION_REQUEST = {
    "type": "object", "required": ["prompt"], "additionalProperties": False,
    "properties": {**_COMMON,
                   "prompt": {"anyOf": [{"type": "string", "minLength": 1},
                                        {"type": "array", "items": {"type": "string", "minLength": 1},
                                         "minItems": 1, "maxItems": MAX_PROMPTS},
                                        _TOKENS,
                                        {"type": "array", "items": _TOKENS, "minItems": 1, "maxItems": MAX_PROMPTS}]},
                   "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS},
                   "echo": {"type": "boolean"}},
}

_MESSAGE = {
    "type": "object", "required": ["role", "content"], "additionalProperties": False,
    "properties": {"role": {"enum": ["system", "user", "assistant", "developer", "tool"]},
                   "content": {"anyOf": [{"type": "string"},
                                         {"type": "array", "items": {
                                             "type": "object", "required": ["type", "text"],
                                             "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}}]},
                   "name": {"type": "string"}},
}

CHAT_REQUEST = {
    "type": "object", "required": ["messages"], "additionalProperties": False,
    "properties": {**_COMMON,
                   "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
                   "max_completion_tokens": {"type": "integer", "minimum": 0, "maximum": MAX_INT},
                   "logprobs": {"type": "boolean"},
                   "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS}},
}

TOKENIZE_REQUEST = {
    "type": "object",
    "properties": {"prompt": {"type": "string"}, "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
                   "add_special_tokens": {"type": "boolean"}, "add_generation_prompt": {"type": "boolean"}},
}

DETOKENIZE_REQUEST = {"type": "object", "required": ["tokens"],
                      "properties": {"tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}}}

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}

_CHOICES = {"type": "array", "items": {"type": "object", "required": ["index", "finish_reason"]}}
COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
              "properties": {"object": {"enum": ["text_completion"]}, "choices": _CHOICES,
                             "usage": {"type": "object", "required": ["prompt_tokens", "completion_tokens"]}}}
CHAT_COMPLETION = {**COMPLETION, "properties": {**COMPLETION["properties"], "object": {"enum": ["chat.completion"]}}}
TOKENS = {"type": "object", "required": ["tokens", "count", "max_model_len"],
          "properties": {"tokens": {"type": "array", "items": _INT}, "count": _INT}}
TEXT = {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}}


def body(schema: dict) -> dict:
    """`openapi_extra` for a route whose JSON request body is `schema`."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def answers(ok: dict | None, *errors: int, stream: bool = False, media: str = "application/json") -> dict:
    """`responses` for a route: 200 with `ok` as `media` (plus text/event-stream when it can stream) and
    the error statuses it can give, each with OpenAI's error body. 401 (API key) applies to every route."""
    content = {media: {"schema": ok or {}}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    out: dict = {200: {"description": "OK", "content": content}}
    for status in sorted({401, 503, *errors}):
        out[status] = {"description": "error", "content": {"application/json": {"schema": ERROR}}}
    return out
