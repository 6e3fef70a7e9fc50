"""Structured output through the server: response_format and tools/tool_choice with the official
`openai` client against a live server on 127.0.0.1 (rwkvcpu/server/tools.py)."""

import json

import pytest

openai = pytest.importorskip("openai", reason="the server tests need the test extra (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the server needs its extra (pip install -e '.[server]')")
jsonschema = pytest.importorskip("jsonschema", reason="the test extra brings jsonschema")
pytest.importorskip("llguidance", reason="structured output needs llguidance: pip install -e '.[test]'")

import rwkvcpu  # noqa: E402
import rwkvcpu.server  # noqa: E402
from rwkvcpu.models import default_model_path  # noqa: E402

TIMEOUT = 120
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 999}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
PARAMS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client():
    model = rwkvcpu.load(default_model_path())
    server = rwkvcpu.server.start(model, port=0, max_batch=4, model_name="rwkv-test")
    try:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    finally:
        server.stop()


def chat(client, **kw):
    kw.setdefault("max_tokens", 400)
    kw.setdefault("seed", 1)
    return client.chat.completions.create(model="rwkv-test", **kw)


def test_response_format_json_schema_and_json_object(client):
    r = chat(client, messages=ASK, response_format={"type": "json_schema", "json_schema": {
        "name": "weather", "schema": WEATHER, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)
    r = chat(client, messages=ASK, n=2, response_format={"type": "json_schema", "json_schema": {
        "name": "add", "schema": ADD}})
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), ADD)
    r = chat(client, messages=ASK, max_tokens=1500, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def check_call(call, name=None):
    assert call.type == "function" and call.id
    assert name is None or call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize("tool_choice, name", [({"type": "function", "function": {"name": "add"}}, "add"),
                                               ("required", None)])
def test_tool_call_round_trip(client, tool_choice, name):
    """A call comes back as tool_calls; its result goes back as a tool message and the model answers."""
    r = chat(client, messages=ASK, tools=TOOLS, tool_choice=tool_choice)
    choice = choice_of(r)
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    check_call(call, name)
    messages = ASK + [choice.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"result": "sunny, 21 degrees"}'}]
    r = chat(client, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=20)
    answer = choice_of(r)
    assert answer.finish_reason in ("stop", "length") and answer.message.tool_calls is None
    assert answer.message.content


def choice_of(r):
    assert len(r.choices) == 1
    return r.choices[0]


def test_auto_is_a_call_or_words(client):
    """tool_choice auto (the default with tools): the reply is a call, or words that do not open
    with '{' (the shipped model, trained on books, answers in words)."""
    for seed in range(3):
        r = client.chat.completions.create(model="rwkv-test", messages=ASK, tools=TOOLS, max_tokens=60, seed=seed)
        c = choice_of(r)
        if c.finish_reason == "tool_calls":
            check_call(c.message.tool_calls[0])
        else:
            assert c.message.tool_calls is None and c.message.content and c.message.content[0] != "{"


def test_streamed_tool_call(client):
    stream = client.chat.completions.create(model="rwkv-test", messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=400, seed=2, stream=True)
    calls, finish = {}, None
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or ():
                entry = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMS[calls[0]["name"]])


@pytest.mark.parametrize("kw, message", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}),
     "response_format: bad JSON schema: Invalid type: strin"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}),
     "Unimplemented keys"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice names function 'nope', which is not among the tools"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                             "uniqueItems": True}}}],
          tool_choice="required"), "tools: bad JSON schema"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
     "response_format json and tools at once"),
])
def test_bad_constraints_are_400(client, kw, message):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, messages=ASK, **kw)
    assert e.value.status_code == 400 and message in e.value.body["message"]
