"""Tools (function calling) on top of chat: the tools go into the prompt, the model's calls come back parsed.

    tools = [{"type": "function", "function": {"name": "weather", "parameters": {...JSON schema...}}}]

- Prompt: an export with its own chat template gets ``tools`` as transformers passes them (Llama 4's template renders
  them); the built-in Llama 4 format (exports without a template) puts them in a system turn, with the JSON call
  format Llama 4 is trained on (``{"name": ..., "parameters": {...}}``). ``role: tool`` messages are the ``ipython``
  turn, and an assistant message's ``tool_calls`` are written back as that JSON.
- Calls: Llama 4 writes them as JSON (one object or a list) or pythonic (``[weather(city="Oslo")]``): both parse.
- ``tool_choice``: ``none`` (no tools in the prompt), ``auto`` (the model chooses; its answer is parsed), ``required``
  or a named function: the answer is constrained (runtimes/constrain.py) to a call of one of the tools / that tool,
  its parameters matching the tool's schema, so it always parses.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from ..errors import UsageError

INSTRUCTION = ("You have access to the following functions. To call a function, respond with only a JSON object of the "
               'form {"name": function name, "parameters": object of argument names and values}. Use a function only '
               "when it helps answer the question.")


def check_tools(tools: Any) -> list[dict]:
    """OpenAI's ``tools``: a list of {"type": "function", "function": {"name", "description"?, "parameters"?}}."""
    if not isinstance(tools, list) or not tools:
        raise UsageError("'tools' must be a non-empty list of {type: function, function: {name, parameters}}")
    out = []
    for n, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise UsageError(f"tools[{n}] must be {{type: function, function: {{name, parameters}}}}")
        if not isinstance(f.get("parameters", {}), dict):
            raise UsageError(f"tools[{n}].function.parameters must be a JSON schema object")
        out.append(f)
    return out


def system_turn(functions: list[dict]) -> dict:
    """The system message that carries the tools in the built-in Llama 4 format."""
    listing = "\n".join(json.dumps({"name": f["name"], "description": f.get("description", ""),
                                    "parameters": f.get("parameters", {})}) for f in functions)
    return {"role": "system", "content": f"{INSTRUCTION}\n\n{listing}"}


def as_turns(messages: list[dict]) -> list[dict]:
    """Messages as the built-in format renders them: ``tool`` -> ``ipython``, an assistant's tool_calls -> JSON text."""
    out = []
    for m in messages:
        if m.get("role") == "tool":
            out.append({"role": "ipython", "content": m.get("content") or ""})
        elif m.get("role") == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "parameters": json.loads(c["function"].get("arguments") or "{}")}
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": json.dumps(calls[0] if len(calls) == 1 else calls)})
        else:
            out.append(m)
    return out


def call_schema(functions: list[dict], name: str | None = None) -> dict:
    """The JSON schema of one call of the tools (or of the one named)."""
    picked = [f for f in functions if name is None or f["name"] == name]
    if not picked:
        raise UsageError(f"tool_choice names '{name}', which is not one of the tools")
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                         "parameters": f.get("parameters") or {"type": "object"}},
                       "required": ["name", "parameters"], "additionalProperties": False} for f in picked]}


def parse_calls(text: str, functions: list[dict]) -> list[dict] | None:
    """The calls in a model's answer ([{"name", "arguments": JSON text}]), or None when it is not a call of a known
    tool: JSON (an object or a list of them, "parameters" or "arguments") or pythonic ``[f(a=1), g(b="x")]``."""
    names = {f["name"] for f in functions}
    text = text.strip()
    calls = _json_calls(text) if text[:1] in "{[" else None
    if calls is None:
        calls = _pythonic_calls(text)
    if not calls or any(c["name"] not in names for c in calls):
        return None
    return [{"name": c["name"], "arguments": json.dumps(c["arguments"])} for c in calls]


def _json_calls(text: str) -> list[dict] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        args = v.get("parameters", v.get("arguments")) if isinstance(v, dict) else None
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not isinstance(args, dict):
            return None
        out.append({"name": v["name"], "arguments": args})
    return out


def _pythonic_calls(text: str) -> list[dict] | None:
    try:
        tree = ast.parse(text if text.startswith("[") else f"[{text}]", mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    out = []
    for c in tree.elts:
        if not isinstance(c, ast.Call) or not isinstance(c.func, ast.Name) or c.args:
            return None
        try:
            out.append({"name": c.func.id, "arguments": {k.arg: ast.literal_eval(k.value) for k in c.keywords}})
        except ValueError:
            return None
    return out


__all__ = ["as_turns", "call_schema", "check_tools", "parse_calls", "system_turn"]
