"""The tool layer: schemas from typed functions, parsing, argument validation, execution."""

from __future__ import annotations

import json
import time
from typing import Literal

import pytest

from taurl.envs.tools import (
    TagToolCallParser,
    Tool,
    ToolCall,
    call_tool,
    format_tool_prompt,
    validate_arguments,
)


def search(query: str, limit: int = 5, mode: Literal["fast", "exact"] = "fast",
           tags: list[str] | None = None, weight: float = 1.0) -> list[str]:
    """Search the notes.

    More text that is not part of the first paragraph.

    Args:
        query: What to look for. Can span
            two lines.
        limit (int): How many hits to return.
        mode: Search mode.

    Returns:
        The matching notes.
    """
    return [query] * limit


def test_schema_from_type_hints_and_docstring() -> None:
    schema = Tool.from_function(search).schema
    fn = schema["function"]
    assert schema["type"] == "function"
    assert fn["name"] == "search"
    assert fn["description"] == "Search the notes."
    params = fn["parameters"]
    assert params["required"] == ["query"]
    assert params["additionalProperties"] is False
    props = params["properties"]
    assert props["query"] == {"type": "string", "description": "What to look for. Can span two lines."}
    assert props["limit"] == {"type": "integer", "description": "How many hits to return.", "default": 5}
    assert props["mode"] == {"enum": ["fast", "exact"], "description": "Search mode.", "default": "fast"}
    assert props["tags"] == {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}],
                             "default": None}
    assert props["weight"]["type"] == "number"
    json.dumps(schema)  # JSON-serialisable


def test_bound_method_and_overrides() -> None:
    class Box:
        def get(self, key: str) -> str:
            """Get a value."""
            return key.upper()

    tool = Tool.from_function(Box().get, name="box_get", examples={"key": "abc"}, timeout_s=2.0)
    assert tool.name == "box_get"
    assert list(tool.parameters["properties"]) == ["key"]
    assert tool.parameters["properties"]["key"]["examples"] == ["abc"]
    assert tool.timeout_s == 2.0


def test_schema_errors_are_readable() -> None:
    def untyped(x):
        return x

    def star(*args: int) -> int:
        return 0

    def odd(x: set[int]) -> int:
        return 0

    with pytest.raises(TypeError, match="parameter 'x' has no type hint"):
        Tool.from_function(untyped)
    with pytest.raises(TypeError, match=r"\*args/\*\*kwargs"):
        Tool.from_function(star)
    with pytest.raises(TypeError, match="no JSON-schema equivalent"):
        Tool.from_function(odd)
    with pytest.raises(ValueError, match="unknown parameters"):
        Tool.from_function(search, examples={"nope": 1})


@pytest.mark.parametrize(
    ("text", "calls", "n_errors"),
    [
        ("no call here", [], 0),
        ('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', [ToolCall("f", {"a": 1})], 0),
        ('x <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call> y <tool_call>{"name": "g"}</tool_call>',
         [ToolCall("f", {}), ToolCall("g", {})], 0),
        ('<tool_call>{"name": "f", "arguments": {"a": 2}}', [ToolCall("f", {"a": 2})], 0),  # unclosed at the end
        ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 3}"}</tool_call>', [ToolCall("f", {"a": 3})], 0),
        ('<tool_call>{"name": "f", "parameters": {"a": 4}}</tool_call>', [ToolCall("f", {"a": 4})], 0),
        ("<tool_call>{name: f}</tool_call>", [], 1),
        ("<tool_call>[1, 2]</tool_call>", [], 1),
        ('<tool_call>{"arguments": {}}</tool_call>', [], 1),
        ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', [], 1),
        ('<tool_call>{"name": "f", "arguments": "{oops"}</tool_call>', [], 1),
        ('<tool_call>{"name": "f"}</tool_call><tool_call>oops</tool_call>', [ToolCall("f", {})], 1),
    ],
)
def test_tag_parser(text: str, calls: list[ToolCall], n_errors: int) -> None:
    got_calls, errors = TagToolCallParser().parse(text)
    assert got_calls == calls
    assert len(errors) == n_errors
    for e in errors:
        assert "<tool_call>" in e  # every error shows the expected format


def test_validate_arguments() -> None:
    params = Tool.from_function(search).parameters
    assert validate_arguments(params, {"query": "x"}) == []
    assert validate_arguments(params, {"query": "x", "limit": 3, "mode": "exact", "tags": ["a"]}) == []
    assert validate_arguments(params, {}) == ["missing required argument 'query'"]
    assert "unknown argument 'q'" in validate_arguments(params, {"query": "x", "q": 1})[0]
    assert "must be integer, got bool" in validate_arguments(params, {"query": "x", "limit": True})[0]
    assert "must be integer, got float" in validate_arguments(params, {"query": "x", "limit": 1.5})[0]
    assert validate_arguments(params, {"query": "x", "weight": 2}) == []  # an int is a number
    assert "must be one of" in validate_arguments(params, {"query": "x", "mode": "slow"})[0]
    assert "does not match" in validate_arguments(params, {"query": "x", "tags": [1]})[0]


def _tools(*fns: object, **kw: object) -> dict[str, Tool]:
    return {t.name: t for t in (Tool.from_function(f, **kw) for f in fns)}  # type: ignore[arg-type]


def boom(x: int) -> int:
    """Always fails."""
    raise RuntimeError(f"cannot handle {x}")


def sleepy(seconds: float) -> str:
    """Sleeps."""
    time.sleep(seconds)
    return "awake"


def test_call_tool_results_and_errors() -> None:
    tools = _tools(search, boom, sleepy)
    ok = call_tool(tools, ToolCall("search", {"query": "a", "limit": 2}))
    assert (ok.content, ok.error) == ('["a", "a"]', False)
    unknown = call_tool(tools, ToolCall("serch", {}))
    assert unknown.error and "unknown tool 'serch'" in unknown.content and "search" in unknown.content
    bad = call_tool(tools, ToolCall("search", {"query": 3}))
    assert bad.error and "bad arguments for 'search'" in bad.content
    raised = call_tool(tools, ToolCall("boom", {"x": 7}))
    assert raised.error and raised.content == "Error: tool 'boom' raised RuntimeError: cannot handle 7"
    raised_in_thread = call_tool(tools, ToolCall("boom", {"x": 8}), timeout_s=5)
    assert raised_in_thread.error and "RuntimeError: cannot handle 8" in raised_in_thread.content
    start = time.perf_counter()
    slow = call_tool(tools, ToolCall("sleepy", {"seconds": 5.0}), timeout_s=0.2)
    assert time.perf_counter() - start < 2
    assert slow.error and "did not finish within 0.2 s" in slow.content
    fast = call_tool(tools, ToolCall("sleepy", {"seconds": 0.0}), timeout_s=5)
    assert (fast.content, fast.error) == ("awake", False)


def test_tool_own_timeout_wins_and_output_is_cut() -> None:
    tools = _tools(sleepy, timeout_s=0.1)
    assert call_tool(tools, ToolCall("sleepy", {"seconds": 3.0}), timeout_s=10).error
    long = call_tool(_tools(search), ToolCall("search", {"query": "x" * 100, "limit": 50}), max_output_chars=100)
    assert long.content.startswith('["' + "x" * 98)
    assert long.content.endswith("more characters cut]")


def test_format_tool_prompt() -> None:
    schemas = [Tool.from_function(search, examples={"query": "apples"}).schema, Tool.from_function(boom).schema]
    text = format_tool_prompt(schemas)
    assert "<tools>\n" + json.dumps(schemas[0]) + "\n" + json.dumps(schemas[1]) + "\n</tools>" in text
    assert '<tool_call>\n{"name": "search", "arguments": {"query": "apples"}}\n</tool_call>' in text
    assert "<answer></answer>" in text and "<tool_response>" in text
    no_example = format_tool_prompt([Tool.from_function(boom).schema])
    assert '{"name": "boom", "arguments": {"x": 1}}' in no_example
    assert "<tool_call>" not in format_tool_prompt([])
