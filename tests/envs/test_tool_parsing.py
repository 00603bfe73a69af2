"""Tool-call parsing: the strict tag format and the lenient formats real models write."""

from __future__ import annotations

import pytest

from taurl.envs.tool_parsing import LenientToolCallParser, TagToolCallParser, ToolCall


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


def test_lenient_parser_reads_call_objects_one_per_line() -> None:
    parser = LenientToolCallParser(tool_names=["calculator", "final_answer"])
    text = ('{"name": "calculator", "arguments": {"expression": "436 * 940"}}\n'
            '{"name": "final_answer", "arguments": {"answer": "409840"}}')
    calls, errors = parser.parse(text)
    assert [c.name for c in calls] == ["calculator", "final_answer"] and not errors
    # prose or a non-call object after the first call ends the list
    calls, _ = parser.parse('{"name": "calculator", "arguments": {"expression": "1+1"}}\n{"answer": 2}')
    assert [c.name for c in calls] == ["calculator"]


def test_lenient_parser_reads_comma_separated_call_objects() -> None:
    parser = LenientToolCallParser(tool_names=["calculator", "final_answer"])
    text = ('```json\n{"name": "calculator", "arguments": {"expression": "2*3"}},\n'
            '{"name": "final_answer", "arguments": {"answer": 6}}\n```')
    calls, errors = parser.parse(text)
    assert [c.name for c in calls] == ["calculator", "final_answer"] and not errors
