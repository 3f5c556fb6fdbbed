"""Structured output and tool calling: grammar masks and call parsing alone, then the openai client
against `fmstack serve` on the default model (SmolLM2-135M-Instruct).

The real-model server serves the default weights with a Hermes-style tool template (SmolLM2's own
template renders no tools, which `test_tools_without_template_support_400` checks on `server`)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch

from fmstack.errors import ParameterError
from fmstack.generation.structured import apply_masks, compile_constraint, parse_response_format
from fmstack.serve.tools import ToolOutput, call_schema, parse_tool_calls, parser_for, template_supports_tools

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                       "maxItems": 2}},
          "required": ["name", "age", "hobbies"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "maxLength": 10}}, "required": ["tz"],
    "additionalProperties": False}}}
PROMPTS = ["Describe a person as JSON.", "Invent a pirate character.", "Tell me about your best friend.",
           "Who wrote Hamlet?", "Make up a chess player.", "Describe a retired teacher.", "A child who loves bikes.",
           "Give me a profile of a chef.", "An astronaut on Mars.", "Describe yourself.", "A famous painter.",
           "Someone who collects stamps.", "Describe a nurse in Paris.", "A farmer with two dogs.",
           "A student of physics.", "An old sailor.", "A jazz musician.", "A marathon runner.",
           "Describe a baker in Rome.", "A software engineer who likes tea."]
N_FAST = 4  # prompts run by default; all 20 under -m slow

HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou can call functions. Their signatures are within <tools></tools>:\n"
    "<tools>{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\nFor a call, answer "
    "<tool_call>{\"name\": <name>, \"arguments\": <arguments>}</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{%- for c in m.get('tool_calls', []) %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
    from fmstack.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf)


# -- without a server ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,value,text", [("json_schema", PERSON, '{"name":"Al","age":3,"hobbies":[]}'),
                                             ("json_object", None, '{"a":[1,2]}'), ("regex", r"\d{3}-[a-z]{2}", "123-ab"),
                                             ("choice", ["yes", "no way"], "no way")])
def test_mask_allows_exactly_the_grammar(smol_tok, kind, value, text):
    c = compile_constraint(smol_tok, kind, value)
    m = c.matcher()
    for i, t in enumerate(smol_tok.encode(text, add_bos=False)):
        rows = torch.zeros(3, 49152)
        apply_masks(rows, [None, m, None])
        assert rows[1, t] == 0 and rows[[0, 2]].isfinite().all()  # unconstrained rows untouched
        assert i > 0 or (~rows[1].isfinite()).sum() > 40000  # the first token: most of the vocabulary is masked
        m.accept(t)
    assert m.done


def test_mask_refuses_off_grammar_tokens(smol_tok):
    m = compile_constraint(smol_tok, "choice", ["yes", "no"]).matcher()
    rows = torch.zeros(1, 49152)
    apply_masks(rows, [m])
    assert rows[0, smol_tok.encode("maybe", add_bos=False)[0]] == float("-inf")
    with pytest.raises(ParameterError, match="refused"):
        m.accept(smol_tok.encode("maybe", add_bos=False)[0])


@pytest.mark.parametrize("kind,value", [("json_schema", {"type": "nonsense"}), ("json_schema", {"$ref": "#/missing"}),
                                        ("regex", "([")])
def test_invalid_grammar_is_a_parameter_error(smol_tok, kind, value):
    with pytest.raises(ParameterError, match="cannot be compiled"):
        compile_constraint(smol_tok, kind, value)


def test_parse_response_format():
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == ("json_object", None)
    assert parse_response_format({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}) == \
        ("json_schema", PERSON)
    for bad in ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": {}}},
                {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}):
        with pytest.raises(ParameterError):
            parse_response_format(bad)


def test_tool_parsers():
    text = 'Let me check.<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>\n' \
           '<tool_call>{"name": "g", "arguments": "{\\"y\\": 2}"}</tool_call>'
    content, calls = parse_tool_calls(text, "hermes")
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["f", "g"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"x": 1}, {"y": 2}]
    assert parse_tool_calls("no call here", "hermes") == ("no call here", [])
    assert parse_tool_calls("<tool_call>{broken</tool_call>", "hermes")[1] == []
    content, calls = parse_tool_calls('<|python_tag|>{"name": "f", "parameters": {"a": "b"}}', "llama3_json")
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"a": "b"}
    assert parse_tool_calls("Hello", "llama3_json") == ("Hello", [])
    assert parser_for("... <|python_tag|> ...") == "llama3_json" and parser_for(HERMES_TEMPLATE) == "hermes"
    assert template_supports_tools(HERMES_TEMPLATE) and not template_supports_tools("{{ messages }}")


def test_tool_stream_holds_back_calls():
    t = ToolOutput("hermes")
    assert t.visible("Sure<tool") == "Sure"  # "<tool" may start a call: held
    assert t.visible('Sure<tool_call>{"name"') == ""
    content, calls, rest = t.finish('Sure<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    assert content == "Sure" and calls and rest == ""
    t = ToolOutput("hermes")
    assert t.visible("a < b") == "a < b"


def test_call_schema_names_one_tool():
    s = call_schema([WEATHER, TIME], "get_time")
    assert s["properties"]["name"] == {"const": "get_time"}
    assert "anyOf" in call_schema([WEATHER, TIME], None)
    with pytest.raises(ParameterError, match="no tool named"):
        call_schema([WEATHER], "nope")


# -- the openai client against the default model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def agent_server(smollm2_gguf, tmp_path_factory):
    from fmstack.checkpoints.native import save_checkpoint
    from fmstack.loading import load_model
    from tests.serve.conftest import ServerProcess

    loaded = load_model(str(smollm2_gguf))
    loaded.tokenizer.chat_template = HERMES_TEMPLATE
    ckpt = save_checkpoint(tmp_path_factory.mktemp("agent") / "ckpt", loaded.model, loaded.tokenizer,
                           source="SmolLM2-135M-Instruct with a tool template")
    del loaded
    s = ServerProcess(["--model", str(ckpt), "--served-model-name", "smol", "--max-model-len", "512",
                       "--kv-cache-mb", "64"], tmp_path_factory.mktemp("log") / "server.log")
    yield s
    s.stop()


def _person_schema_reply(client, prompt: str, stream: bool = False) -> str:
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        r = client.chat.completions.create(model="smol", messages=messages, response_format=rf, max_tokens=80)
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].message.content
    chunks = client.chat.completions.create(model="smol", messages=messages, response_format=rf, max_tokens=80,
                                            stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _check_prompts(client, prompts):
    for i, p in enumerate(prompts):
        text = _person_schema_reply(client, p, stream=i % 2 == 1)
        jsonschema.validate(json.loads(text), PERSON)


def test_json_schema_chat_validates(agent_server):
    _check_prompts(agent_server.client(), PROMPTS[:N_FAST])


@pytest.mark.slow
def test_json_schema_chat_validates_20_prompts(agent_server):
    _check_prompts(agent_server.client(), PROMPTS)


def test_completions_constraints(agent_server):
    c = agent_server.client()
    r = c.completions.create(model="smol", prompt="Is the sky blue? Answer:", max_tokens=5,
                             extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].text in ("yes", "no")
    r = c.completions.create(model="smol", prompt="A phone number:", max_tokens=20,
                             extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert len(r.choices[0].text) == 8 and r.choices[0].text[3] == "-"
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="smol", prompt="A JSON object:", max_tokens=40, stream=True,
        extra_body={"response_format": {"type": "json_object"}}) if ch.choices)
    try:
        assert isinstance(json.loads(text), dict)
    except ValueError:  # cut by max_tokens: still a prefix of an object
        assert text.startswith("{")


def test_forced_tool_call_streamed_and_not(agent_server):
    """The streamed deltas (id/type/name first, then argument fragments) assemble to the very call of
    the non-streamed answer (greedy: the same text)."""
    c = agent_server.client()
    kw = dict(model="smol", messages=[{"role": "user", "content": "What's the weather in Paris?"}],
              tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}},
              max_tokens=60, temperature=0)
    r = c.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    streamed, finish, fragments = {}, None, 0
    for ch in c.chat.completions.create(stream=True, **kw):
        if not ch.choices:
            continue
        finish = ch.choices[0].finish_reason or finish
        for tc in ch.choices[0].delta.tool_calls or []:
            call = streamed.setdefault(tc.index, {"name": None, "arguments": ""})
            if tc.id:
                assert tc.id.startswith("call_") and call["name"] is None
                call["name"] = tc.function.name
            else:
                fragments += 1
            call["arguments"] += tc.function.arguments or ""
    assert finish == "tool_calls" and fragments > 1
    assert streamed == {0: {"name": "get_weather", "arguments": calls[0].function.arguments}}


def test_required_tool_call_and_tool_result_round_trip(agent_server):
    c = agent_server.client()
    messages = [{"role": "user", "content": "What time is it in Tokyo?"}]
    r = c.chat.completions.create(model="smol", messages=messages, tools=[WEATHER, TIME], tool_choice="required",
                                  max_tokens=60)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time")
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    r = c.chat.completions.create(model="smol", messages=messages, tools=[WEATHER, TIME], max_tokens=10)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("kw,param", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
     "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/x"}}}),
     "response_format"),
    (dict(response_format={"type": "yaml"}), "response_format"),
    (dict(extra_body={"guided_regex": "(["}), "guided_regex"),
    (dict(extra_body={"guided_choice": []}), "guided_choice"),
    (dict(response_format={"type": "json_object"}, extra_body={"guided_regex": "a"}), "guided_regex"),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "tools"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools"),
])
def test_bad_requests_are_400(agent_server, kw, param):
    c = agent_server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=4, **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert agent_server.alive()


def test_tools_without_template_support_400(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError, match="does not render tools") as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
                                  max_tokens=4)
    assert e.value.body["param"] == "tools"
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
                                  tool_choice="none", max_tokens=4)
    assert r.choices[0].message.tool_calls is None


def test_generator_follows_json_schema(smol_tok):
    from fmstack.config import ModelConfig
    from fmstack.generation.generate import Generator
    from fmstack.generation.sampling import SamplingParams
    from fmstack.models.build import build_model

    cfg = ModelConfig(name="tiny", vocab_size=49152, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                      max_seq_len=256, tie_embeddings=True)
    model = build_model(cfg)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    c = compile_constraint(smol_tok, "json_schema", schema)
    prompt = smol_tok.encode("Answer:")
    free, constrained = Generator(model, smol_tok).generate(
        [prompt, prompt], [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=60, temperature=1.0,
                                                                             seed=1)], constraints=[None, c])
    jsonschema.validate(json.loads(constrained.text), schema)
    assert constrained.finish_reason == "stop"
    assert free.text == Generator(model, smol_tok).generate([prompt], SamplingParams(max_new_tokens=12))[0].text


@pytest.mark.slow  # CI time (20 min on 2 cores): run with -m slow
def test_cli_generate_json_schema(tiny_ckpt, tmp_path):
    import subprocess
    import sys

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "bad.json").write_text('{"type": "nonsense"}')
    base = [sys.executable, "-m", "fmstack", "generate", "Answer:", "--model", str(tiny_ckpt), "--max-new-tokens", "20"]
    out = subprocess.run(base + ["--json-schema", str(tmp_path / "s.json")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout.strip().splitlines()[-1]), schema)
    out = subprocess.run(base + ["--json-schema", str(tmp_path / "bad.json")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "--json-schema" in out.stderr
