"""Tools: schemas from typed functions, argument validation, execution, and ToolEnv's parser choice.

Parsing has its own tests in test_tool_parsing.py.
"""

from __future__ import annotations

import json
import time
from typing import Literal

import gymnasium
import pytest

import taurl.envs  # noqa: F401  (registers the ids)
from taurl.envs.tool_execution import call_tool, validate_arguments
from taurl.envs.tool_parsing import LenientToolCallParser, TagToolCallParser, ToolCall
from taurl.envs.tools import Tool, format_tool_prompt
from taurl.errors import ConfigError


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


# -- ToolEnv's parser choice ------------------------------------------------------------


def test_calculator_env_reads_bare_json_and_strict_mode_does_not() -> None:
    action = '{"name": "calculator", "arguments": {"expression": "347 * 829"}}'
    env = gymnasium.make("taurl/Calculator-v0")
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(action)
    assert obs == [{"role": "user", "content": "<tool_response>\n287663\n</tool_response>"}]
    assert (reward, terminated, truncated, info["tool_calls"], info["tool_errors"]) == (0.0, False, False, 1, 0)

    strict = gymnasium.make("taurl/Calculator-v0", parser="tags")
    strict.reset(seed=0)
    obs, _, terminated, _, info = strict.step(action)
    assert obs == [] and terminated and info["tool_calls"] == 0  # read as the final answer


@pytest.mark.parametrize("env_id", ["taurl/Calculator-v0", "taurl/SQL-v0", "taurl/Code-v0", "taurl/Web-v0"])
def test_every_tool_env_takes_the_parser_option(env_id: str) -> None:
    auto = gymnasium.make(env_id, disable_env_checker=True)
    strict = gymnasium.make(env_id, parser="tags", disable_env_checker=True)
    try:
        assert isinstance(auto.unwrapped.parser, LenientToolCallParser)
        assert auto.unwrapped.parser.tool_names == frozenset(auto.unwrapped.tools)
        assert isinstance(strict.unwrapped.parser, TagToolCallParser)
    finally:
        auto.close()
        strict.close()
    with pytest.raises(ConfigError, match=r"parser must be one of \['auto', 'tags'\].*got 'tag'"):
        gymnasium.make(env_id, parser="tag", disable_env_checker=True)


def test_answer_tool_scores_the_whole_argument_and_refuses_a_clashing_tool() -> None:
    from taurl.envs.base import Task, ToolEnv
    from taurl.errors import ConfigError

    class Echo(ToolEnv):
        tasks = {"train": [Task(id="t0", prompt="Say it.", answer="x" * 3000)], "heldout": []}  # noqa: RUF012

        def score(self, task: Task, answer: str) -> bool:
            return answer == task.answer

    def ping() -> str:
        """Answer pong."""
        return "pong"

    env = Echo([ping], answer_tool=True)
    env.reset(seed=0)
    # longer than max_tool_output_chars (2000): scored whole, and through extract_answer
    _, reward, terminated, _, info = env.step(
        json.dumps({"name": "final_answer", "arguments": {"answer": "<answer>" + "x" * 3000 + "</answer>"}})
    )
    assert terminated and reward == 1.0 and info["success"] is True

    def final_answer(answer: str) -> str:
        """Mine."""
        return answer

    with pytest.raises(ConfigError, match="already named 'final_answer'.*answer_tool=False"):
        Echo([final_answer], answer_tool=True)


def test_error_messages_echoing_model_text_are_bounded() -> None:
    def echo(text: str) -> str:
        """Fails with the argument in its message.

        Args:
            text: anything
        """
        raise ValueError(text)

    tools = {"echo": Tool.from_function(echo)}
    long = "x" * 100_000
    res = call_tool(tools, ToolCall("echo", {"text": long}), max_output_chars=500)
    assert res.error and len(res.content) < 700 and "more characters cut" in res.content
    res = call_tool(tools, ToolCall("y" * 100_000, {}), max_output_chars=500)
    assert res.error and len(res.content) < 700 and len(res.name) <= 200
