"""The tool layer: schemas from typed functions, parsing, argument validation, execution."""

from __future__ import annotations

import json
import time
from typing import Literal

import gymnasium
import pytest

import taurl.envs  # noqa: F401  (registers the ids)
from taurl.envs.tools import (
    LenientToolCallParser,
    TagToolCallParser,
    Tool,
    ToolCall,
    call_tool,
    format_tool_prompt,
    validate_arguments,
)
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


# -- lenient parsing: the formats real models write ---------------------------------------

CALC = '{"name": "calculator", "arguments": {"expression": "2 + 3"}}'
CALC_CALL = ToolCall("calculator", {"expression": "2 + 3"})


def lenient() -> LenientToolCallParser:
    return LenientToolCallParser(["calculator", "sql"])


@pytest.mark.parametrize(
    "text",
    [
        f"<tool_call>{CALC}</tool_call>",
        CALC,
        f"  \n{CALC}\n ",
        f"I will use the calculator. {CALC}",
        f"```json\n{CALC}\n```",
        f"```JSON\n{CALC}\n```",
        f"```\n{CALC}\n```",
        f"```json\n{CALC}",  # unclosed fence at the end
        f"Let me compute it.\n\n```json\n{CALC}\n```\nThen I will answer.",
        f"```json\n[{CALC}]\n```",
        '{"name": "calculator", "arguments": "{\\"expression\\": \\"2 + 3\\"}"}',  # arguments as a JSON string
        '```json\n{"name": "calculator", "parameters": {"expression": "2 + 3"}}\n```',
        f"{CALC}\nThe result will come back next.",  # text after a leading call is ignored, as after tags
    ],
)
def test_lenient_parser_reads_each_format(text: str) -> None:
    assert lenient().parse(text) == ([CALC_CALL], [])


def test_lenient_parser_several_calls() -> None:
    sql = '{"name": "sql", "arguments": {"query": "SELECT 1"}}'
    two = [CALC_CALL, ToolCall("sql", {"query": "SELECT 1"})]
    assert lenient().parse(f"First:\n```json\n{CALC}\n```\nthen:\n```json\n{sql}\n```") == (two, [])
    assert lenient().parse(f"[{CALC}, {sql}]") == (two, [])


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 5.",
        '{"answer": 5}',
        '{"name": "Alice", "arguments": {"age": 3}}',  # not a known tool
        '{"name": "calculater", "arguments": {"expression": "2 + 3"}}',  # misspelt: not a call either
        '```json\n{"answer": 5}\n```',
        "```python\ndef f(x):\n    return x * 2\n```",
        f"```python\nprint({CALC})\n```",  # JSON inside code is code
        f"One could write {CALC} but it is easy: <answer>5</answer>",  # a call in the middle of prose
        "[1, 2, 3] are the roots.",
        f'```json\n[{CALC}, {{"answer": 5}}]\n```',  # a list counts only if all of it is calls
        'I tried {"name": "calculator", "arguments": {"expression": ',  # broken JSON after prose
        '```json\n{"answer": 5,\n```',  # broken JSON naming no tool
    ],
)
def test_lenient_parser_leaves_final_answers_alone(text: str) -> None:
    assert lenient().parse(text) == ([], [])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"name": "calculator", "arguments": {"expression": "2 +', "the message is not valid JSON"),
        ('```json\n{"name": "sql", "arguments": {"query": SELECT 1}}\n```', "the fenced block is not valid JSON"),
        ('{"name": "calculator", "arguments": [1]}', '"arguments" must be a JSON object'),
        ('{"name": "calculator", "arguments": "{oops"}', '"arguments" is a string but not valid JSON'),
        ("<tool_call>{not json}</tool_call>", "the text inside <tool_call> is not valid JSON"),
    ],
)
def test_lenient_parser_reports_broken_calls_to_known_tools(text: str, message: str) -> None:
    calls, errors = lenient().parse(text)
    assert calls == [] and len(errors) == 1
    assert message in errors[0] and "<tool_call>" in errors[0]  # the fix: the canonical format


def test_lenient_parser_tags_win() -> None:
    text = f'<tool_call>{{"name": "sql", "arguments": {{"query": "SELECT 2"}}}}</tool_call>\n```json\n{CALC}\n```'
    assert lenient().parse(text) == ([ToolCall("sql", {"query": "SELECT 2"})], [])


def test_lenient_parser_without_tool_names() -> None:
    any_name = LenientToolCallParser(None)
    assert any_name.parse('{"name": "anything", "arguments": {}}') == ([ToolCall("anything", {})], [])
    assert any_name.parse('{"name": "Alice"}') == ([], [])  # no "arguments": an answer, not a call
    with pytest.raises(TypeError, match="collection of tool-name strings"):
        LenientToolCallParser("calculator")


def test_strict_parser_ignores_bare_json() -> None:
    assert TagToolCallParser().parse(CALC) == ([], [])
    assert TagToolCallParser().parse(f"```json\n{CALC}\n```") == ([], [])


@pytest.mark.parametrize("parser", [TagToolCallParser(), LenientToolCallParser(["x", "calculator"])])
@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name":"x","arguments":{"a":' + "[" * 1000,  # RecursionError inside json
        '<tool_call>{"name":"x","arguments":{"a":' + "1" * 5000 + "}}</tool_call>",  # int digit limit
        '<tool_call>{"name":"x","arguments":"{\\"a\\": ' + "1" * 5000 + '}"}</tool_call>',
        '{"name":"calculator","arguments":{"a":' + "[" * 1000,
        '{"name":"calculator","arguments":{"a":' + "1" * 5000 + "}}",
        '```json\n{"name":"calculator","arguments":' + "[" * 1000 + "\n```",
        '```json\n{"name":"calculator","arguments":{"a":' + "9" * 5000 + "}}\n```",
    ],
)
def test_unreadable_json_is_an_error_not_an_exception(parser: object, text: str) -> None:
    calls, errors = parser.parse(text)  # type: ignore[attr-defined]
    assert calls == []
    if isinstance(parser, LenientToolCallParser) or text.startswith("<tool_call>"):
        assert len(errors) == 1 and "malformed tool call" in errors[0]
        assert "nested too deeply" in errors[0] or "digits" in errors[0]


@pytest.mark.parametrize(
    ("text", "call"),
    [
        ('{"name": "calculator", "arguments": {"expression": "347 * 829"}}',
         ToolCall("calculator", {"expression": "347 * 829"})),
        ('```json\n{"name": "calculator", "arguments": {"expression": "58 * 613"}}\n```',
         ToolCall("calculator", {"expression": "58 * 613"})),
        (('To find the product, I will use the calculator.\n\n```json\n{\n  "name": "calculator",\n'
          '  "arguments": {\n    "expression": "412*77"\n  }\n}\n```'),
         ToolCall("calculator", {"expression": "412*77"})),
        ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "905 * 311"}}\n</tool_call>',
         ToolCall("calculator", {"expression": "905 * 311"})),
        ('```\n{"name": "sql", "arguments": {"query": "SELECT COUNT(*) FROM employees"}}\n```',
         ToolCall("sql", {"query": "SELECT COUNT(*) FROM employees"})),
        ('{"name": "sql", "arguments": {"query": "SELECT name FROM departments"}}',
         ToolCall("sql", {"query": "SELECT name FROM departments"})),
    ],
)
def test_real_qwen_coder_outputs(text: str, call: ToolCall) -> None:
    """Verbatim outputs of Qwen2.5-Coder-0.5B-Instruct: each is one call."""
    assert lenient().parse(text) == ([call], [])


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


def test_lenient_parser_reads_call_objects_one_per_line() -> None:
    from taurl.envs.tools import LenientToolCallParser

    parser = LenientToolCallParser(tool_names=["calculator", "final_answer"])
    text = ('{"name": "calculator", "arguments": {"expression": "436 * 940"}}\n'
            '{"name": "final_answer", "arguments": {"answer": "409840"}}')
    calls, errors = parser.parse(text)
    assert [c.name for c in calls] == ["calculator", "final_answer"] and not errors
    # prose or a non-call object after the first call ends the list
    calls, _ = parser.parse('{"name": "calculator", "arguments": {"expression": "1+1"}}\n{"answer": 2}')
    assert [c.name for c in calls] == ["calculator"]


def test_lenient_parser_reads_comma_separated_call_objects() -> None:
    from taurl.envs.tools import LenientToolCallParser

    parser = LenientToolCallParser(tool_names=["calculator", "final_answer"])
    text = ('```json\n{"name": "calculator", "arguments": {"expression": "2*3"}},\n'
            '{"name": "final_answer", "arguments": {"answer": 6}}\n```')
    calls, errors = parser.parse(text)
    assert [c.name for c in calls] == ["calculator", "final_answer"] and not errors


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
