"""Tools (function calling, issue 28): the calls Llama 4 writes parse in both of its forms (the server's tools are
tested against a real server in tests/test_serve.py)."""

from __future__ import annotations

import json

import pytest

from l4export.runtimes.tools import call_schema, parse_calls

WEATHER = {"name": "weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]},
                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city", "days"], "additionalProperties": False}}
TIME = {"name": "time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, TIME)]


@pytest.mark.parametrize("text, calls", [
    ('{"name": "weather", "parameters": {"city": "Oslo", "days": 2}}', [("weather", {"city": "Oslo", "days": 2})]),
    ('[{"name": "time", "arguments": {"zone": "UTC"}}, {"name": "weather", "parameters": {"city": "Lima", "days": 1}}]',
     [("time", {"zone": "UTC"}), ("weather", {"city": "Lima", "days": 1})]),
    ('[weather(city="Oslo", days=3)]', [("weather", {"city": "Oslo", "days": 3})]),
    ('time(zone="CET")', [("time", {"zone": "CET"})]),
    ("It is sunny in Oslo.", None),
    ('{"name": "unknown", "parameters": {}}', None),
    ("[weather(city=input())]", None),
])
def test_both_call_forms_parse(text, calls):
    got = parse_calls(text, [WEATHER, TIME])
    assert (None if got is None else [(c["name"], json.loads(c["arguments"])) for c in got]) == calls


def test_call_schema_names_the_tool():
    s = call_schema([WEATHER, TIME], "time")
    assert len(s["anyOf"]) == 1 and s["anyOf"][0]["properties"]["name"] == {"const": "time"}
    with pytest.raises(Exception, match="not one of the tools"):
        call_schema([WEATHER], "time")
