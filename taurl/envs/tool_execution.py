"""Tool execution: checking a parsed call's arguments, running the tool, and formatting the result.

**Results** go back to the model as a ``user`` message (not ``tool``: SmolLM2's chat
template, like many small models', has no tool role, and a user message renders the
same under every template) whose content holds one block per call::

    <tool_response>
    7
    </tool_response>

A failed call (malformed JSON, unknown tool, bad arguments, a tool that raised or
timed out) gets a block that starts with ``Error:`` and says what to fix.

**Time limits.** With ``timeout_s`` set, a tool runs in a fresh daemon thread and the
caller waits at most ``timeout_s``; a tool still running after that is reported as
timed out and its thread is left to finish on its own (Python cannot kill a thread;
being a daemon it never blocks interpreter exit). Tools that can hang for real
(code execution) should enforce their own limit as well, e.g. in a subprocess.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from taurl.envs.tool_parsing import ToolCall
from taurl.envs.tools import Tool
from taurl.types import JSONValue

# -- validation ------------------------------------------------------------------------


def _type_ok(value: object, json_type: str) -> bool:
    if json_type == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if json_type == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if json_type == "boolean":
        return isinstance(value, bool)
    if json_type == "string":
        return isinstance(value, str)
    if json_type == "array":
        return isinstance(value, list)
    if json_type == "object":
        return isinstance(value, dict)
    if json_type == "null":
        return value is None
    return True


def _check_value(value: object, schema: Mapping[str, JSONValue], where: str) -> list[str]:
    if "enum" in schema:
        allowed = schema["enum"]
        return [] if value in allowed else [f"{where} must be one of {allowed}, got {value!r}"]
    if "anyOf" in schema:
        options = schema["anyOf"]
        if any(not _check_value(value, o, where) for o in options):  # type: ignore[union-attr]
            return []
        return [f"{where} does not match any allowed type, got {value!r}"]
    json_type = schema.get("type")
    if json_type is None:
        return []
    allowed_types = json_type if isinstance(json_type, list) else [json_type]
    if not any(_type_ok(value, t) for t in allowed_types):  # type: ignore[arg-type]
        expected = " or ".join(str(t) for t in allowed_types)
        return [f"{where} must be {expected}, got {type(value).__name__} {json.dumps(value)[:60]}"]
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        errors: list[str] = []
        for i, item in enumerate(value):
            errors += _check_value(item, schema["items"], f"{where}[{i}]")  # type: ignore[arg-type]
        return errors
    return []


def validate_arguments(parameters: Mapping[str, JSONValue], arguments: Mapping[str, JSONValue]) -> list[str]:
    """Check ``arguments`` against a tool's parameters schema; return readable errors ([] if valid).

    Covers what tool schemas built by :meth:`Tool.from_function` use: required and
    unknown keys, JSON types (``integer`` rejects ``true`` and ``1.5``), ``enum``,
    ``anyOf`` and array item types.
    """
    props: Mapping[str, JSONValue] = parameters.get("properties") or {}  # type: ignore[assignment]
    errors: list[str] = []
    for name in parameters.get("required", []):  # type: ignore[union-attr]
        if name not in arguments:
            errors.append(f"missing required argument {name!r}")
    if parameters.get("additionalProperties") is not True:  # the function would reject them anyway
        for name in arguments:
            if name not in props:
                errors.append(f"unknown argument {name!r} (arguments are: {', '.join(props) or 'none'})")
    for name, value in arguments.items():
        if name in props:
            errors += _check_value(value, props[name], f"argument {name!r}")  # type: ignore[arg-type]
    return errors


# -- execution -------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one call: the text shown to the model and whether it failed."""

    name: str
    content: str
    error: bool


def _stringify(value: object) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def call_tool(
    tools: Mapping[str, Tool],
    call: ToolCall,
    *,
    timeout_s: float | None = None,
    max_output_chars: int = 2000,
) -> ToolResult:
    """Run one call and always return a :class:`ToolResult` (errors included; never raises).

    Args:
        tools: The available tools by name.
        call: The parsed call.
        timeout_s: Limit for this call, used when the tool has no ``timeout_s`` of its own.
        max_output_chars: Longer outputs are cut, with a note saying how much was cut.
    """
    def result(name: str, text: str, error: bool) -> ToolResult:
        # Every string echoed back is bounded: names, arguments and exception messages
        # come from model text and can be arbitrarily long.
        if len(text) > max_output_chars:
            cut = len(text) - max_output_chars
            text = text[:max_output_chars] + f"\n[... {cut} more characters cut]"
        return ToolResult(name[:200], text, error)

    tool = tools.get(call.name)
    if tool is None:
        known = ", ".join(sorted(tools)) or "none"
        return result(call.name, f"Error: unknown tool {call.name[:200]!r}; available tools: {known}", True)
    problems = validate_arguments(tool.parameters, call.arguments)
    if problems:
        return result(tool.name, f"Error: bad arguments for {tool.name!r}: " + "; ".join(problems), True)
    limit = tool.timeout_s if tool.timeout_s is not None else timeout_s
    try:
        value = tool.fn(**call.arguments) if limit is None else _run_with_timeout(tool, call, limit)
        text = _stringify(value)
    except _ToolTimeout:
        return result(tool.name, f"Error: tool {tool.name!r} did not finish within {limit:g} s", True)
    except Exception as e:  # noqa: BLE001  a tool's failure is the model's observation, not the env's crash
        try:
            message = str(e)
        except Exception:  # noqa: BLE001  e.g. an int too long to print
            message = "(its message could not be shown)"
        return result(tool.name, f"Error: tool {tool.name!r} raised {type(e).__name__}: {message}", True)
    return result(tool.name, text, False)


class _ToolTimeout(Exception):
    pass


def _run_with_timeout(tool: Tool, call: ToolCall, limit: float) -> object:
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = tool.fn(**call.arguments)
        except BaseException as e:  # noqa: BLE001  handed to the caller's thread below
            box["error"] = e

    thread = threading.Thread(target=target, name=f"taurl-tool-{tool.name}", daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        raise _ToolTimeout
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


def format_tool_response(result: ToolResult) -> str:
    """One ``<tool_response>`` block for a result."""
    return f"<tool_response>\n{result.content}\n</tool_response>"


def format_tool_error(message: str) -> str:
    """A ``<tool_response>`` block carrying an error message (``Error: ...``)."""
    return f"<tool_response>\nError: {message}\n</tool_response>"

