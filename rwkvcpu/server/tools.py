"""OpenAI's response_format, tools and tool_choice as rwkvcpu constraints, and tool calls back out.

A chat completion with ``response_format`` json_object or json_schema is generated
under that constraint (rwkvcpu.structured). With ``tools``, ``tool_choice`` says what
the reply may be:

| tool_choice | the reply is constrained to | returned as |
| --- | --- | --- |
| ``"none"`` | nothing (text) | content |
| a function ``{"type": "function", "function": {"name": N}}``, or ``"required"`` with one tool | the JSON of N's parameters | one tool call of N |
| ``"required"`` with several tools | ``{"name": N, "arguments": {...}}`` for one of them | one tool call of N |
| ``"auto"`` (the default) | that object, or text that does not start with ``{`` | a tool call, or content |

A tool call ends the choice with ``finish_reason: "tool_calls"``. The tools are
described to the model in a system turn before the conversation (RWKV's chat format
has no tool role; earlier calls and their results are turns of their own).
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any, Optional

from ..errors import InvalidArgumentError
from ..structured import JSON_FORMAT, Constraint, make_constraint

FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def response_format_constraint(response_format: Optional[dict]) -> Optional[Constraint]:
    """The constraint a chat request's response_format asks for (None for text).

    Args:
        response_format: ``{"type": "text"}``, ``{"type": "json_object"}`` or
            ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``
            (strict or not, the output is held to the schema).

    Raises:
        InvalidArgumentError: another type, a json_schema without a schema object, or a
            schema the engine refuses (named).
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InvalidArgumentError("response_format must be an object with a type")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return make_constraint(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidArgumentError("response_format json_schema needs {\"name\": ..., \"schema\": {...}}")
        return make_constraint(json_schema=spec.get("schema", {}))
    raise InvalidArgumentError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


def _functions(tools) -> dict:
    """name -> function spec of OpenAI's tools list; InvalidArgumentError for anything malformed."""
    if not isinstance(tools, list) or not tools:
        raise InvalidArgumentError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    out = {}
    for i, tool in enumerate(tools):
        f = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise InvalidArgumentError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        if not FUNCTION_NAME.fullmatch(f["name"]):
            raise InvalidArgumentError(f"tools[{i}] function name {f['name']!r} must be 1 to 64 letters, digits, _ or -")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InvalidArgumentError(f"tools[{i}] parameters must be a JSON schema object")
        out[f["name"]] = dict(f, parameters=params)
    return out


@dataclasses.dataclass
class ToolPlan:
    """How one chat request may call tools.

    Attributes:
        mode: "none", "function" (the reply is the arguments of `function`), "any"
            (a call of one of the tools) or "auto" (a call, or text).
        function: the forced function's name (mode "function").
        constraint: what the reply is held to, or None (mode "none").
        system: the system turn describing the tools to the model ("" for mode "none").
    """

    mode: str
    function: Optional[str] = None
    constraint: Optional[Constraint] = None
    system: str = ""

    def tool_calls(self, text: str) -> Optional[list]:
        """OpenAI's tool_calls for a complete reply, or None when the reply is text.

        Returns:
            [{"id": "call_...", "type": "function", "function": {"name": ..., "arguments": "<JSON>"}}]
        """
        if self.mode == "none":
            return None
        if self.mode == "function":
            name, arguments = self.function, text
        else:
            if self.mode == "auto" and not text.startswith("{"):
                return None
            call = json.loads(text)
            name, arguments = call["name"], json.dumps(call["arguments"], ensure_ascii=False)
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": name, "arguments": arguments}}]


def call_text(tool_calls: Optional[list]) -> str:
    """An assistant's earlier tool calls as the reply text the model writes for one:
    ``{"name": N, "arguments": {...}}`` (one a line)."""
    lines = []
    for call in tool_calls or ():
        f = call.get("function", {}) if isinstance(call, dict) else {}
        arguments = f.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            pass
        lines.append(json.dumps({"name": f.get("name"), "arguments": arguments}, ensure_ascii=False))
    return "\n".join(lines)


def _call_schema(functions: dict) -> dict:
    """The JSON of a call of one of `functions`: {"name": N, "arguments": N's parameters}."""
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": f["parameters"]},
                       "required": ["name", "arguments"], "additionalProperties": False}
                      for name, f in functions.items()]}


def describe(functions: dict, mode: str) -> str:
    """The system turn that tells the model which functions it may call, and how."""
    specs = json.dumps([{k: f[k] for k in ("name", "description", "parameters") if k in f}
                        for f in functions.values()], ensure_ascii=False)
    how = {"function": "Reply with the JSON arguments of the function.",
           "any": 'To call a function, reply with JSON: {"name": ..., "arguments": {...}}.',
           "auto": 'To call a function, reply with JSON only: {"name": ..., "arguments": {...}}; '
                   'otherwise reply in words.'}[mode]
    return f"You can call these functions: {specs}. {how}"


def plan_tools(tools: Optional[list], tool_choice: Any) -> ToolPlan:
    """The ToolPlan of a chat request's tools and tool_choice (OpenAI's semantics).

    Raises:
        InvalidArgumentError: malformed tools or tool_choice, a tool_choice naming a
            function that is not among the tools, a parameters schema the engine refuses.
    """
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidArgumentError("tool_choice needs tools")
        return ToolPlan("none")
    functions = _functions(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan("none")
    if isinstance(choice, dict):
        f = choice.get("function") if choice.get("type", "function") == "function" else None
        name = f.get("name") if isinstance(f, dict) else None
        if name not in functions:
            raise InvalidArgumentError(f"tool_choice names function {name!r}, which is not among the tools "
                                       f"({', '.join(functions)})")
        mode = "function"
    elif choice == "required":
        mode, name = ("function", next(iter(functions))) if len(functions) == 1 else ("any", None)
    elif choice == "auto":
        mode, name = "auto", None
    else:
        raise InvalidArgumentError(f"tool_choice must be none, auto, required or "
                                   f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {choice!r}")
    try:
        if mode == "function":
            constraint = make_constraint(json_schema=functions[name]["parameters"])
        elif mode == "any":
            constraint = make_constraint(json_schema=_call_schema(functions))
        else:
            # a call, or words that do not open with '{' (llguidance's Lark with an inline JSON schema)
            schema = dict(_call_schema(functions), **{"x-guidance": JSON_FORMAT})
            constraint = make_constraint(grammar="start: call | TEXT\nTEXT: /[^{][\\s\\S]*/\n"
                                                 f"call: %json {json.dumps(schema)}\n")
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"tools: {e}") from None
    return ToolPlan(mode, name, constraint, describe(functions, mode))
