"""Tool-call parsing: finding the calls a model wrote in its message text.

**Call format.** :class:`TagToolCallParser` reads calls written as JSON inside tags,
several per message allowed::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "2 + 3"}}
    </tool_call>

``"arguments"`` may also be a JSON-encoded string (OpenAI style), and
``"parameters"`` is read as a synonym. Small instruction-tuned models often drop the
tags and write the same object bare (the whole message) or in a ```` ```json ````
fence; :class:`LenientToolCallParser`, the default of
:class:`~taurl.envs.base.ToolEnv` (``parser="auto"``), reads those too, but only when
``"name"`` is one of the env's tools, so a final answer that happens to be JSON or
code stays a final answer. ``parser="tags"`` keeps the strict format. Any other
format plugs in through the :class:`ToolCallParser` protocol. Parsing never raises:
text that cannot be read (bad JSON, nesting too deep, a number too long) becomes a
malformed-call error.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from taurl.types import JSONValue


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the tool's name and its arguments object."""

    name: str
    arguments: dict[str, JSONValue] = field(default_factory=dict)


class ToolCallParser(Protocol):
    """Finds tool calls in assistant text.

    ``parse(text)`` returns ``(calls, errors)``: the well-formed calls in order, and
    one readable message per malformed one (each message tells the model how to fix
    it). Text with neither is a final answer.
    """

    def parse(self, text: str) -> tuple[list[ToolCall], list[str]]: ...


_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_TAG_HINT = 'write <tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>'
_DECODER = json.JSONDecoder()


def _decode_json(text: str, start: int = 0) -> tuple[object, int, str]:
    """Decode one JSON value at ``text[start:]`` without ever raising on model text.

    Returns ``(value, end, "")`` on success (``end``: index just after the value), else
    ``(None, start, why)`` with a short reason for an error message. Besides syntax
    errors, ``json`` raises RecursionError on deep nesting (``[[[[...``) and ValueError
    on integers over Python's int-string conversion limit (4,300 digits); a model can
    write either, so both are reasons here, not exceptions.
    """
    try:
        value, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as e:
        return None, start, f"{e.msg} at position {e.pos}"
    except RecursionError:
        return None, start, "it is nested too deeply"
    except ValueError as e:
        return None, start, str(e).split(";")[0]
    return value, end, ""


def _loads(text: str) -> tuple[object, str]:
    """Like ``json.loads`` (the whole text is one value, surrounding whitespace allowed), but never raises.

    Returns ``(value, "")`` or ``(None, why)``.
    """
    start = len(text) - len(text.lstrip())
    value, end, why = _decode_json(text, start)
    if why:
        return None, why
    if text[end:].strip():
        return None, f"Extra data at position {end}"
    return value, ""


def _call_from_object(obj: object, hint: str) -> tuple[ToolCall | None, str]:
    """Turn a decoded JSON value into a :class:`ToolCall`, or ``(None, error)`` saying what is wrong."""
    if not isinstance(obj, dict):
        return None, f"malformed tool call: expected a JSON object, got {type(obj).__name__}; {hint}"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None, f'malformed tool call: missing "name" (a string); {hint}'
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args, why = _loads(args) if args.strip() else ({}, "")
        if why:
            return None, f'malformed tool call to {name!r}: "arguments" is a string but not valid JSON ({why}); {hint}'
    if not isinstance(args, dict):
        return None, f'malformed tool call to {name!r}: "arguments" must be a JSON object, got {type(args).__name__}; {hint}'
    return ToolCall(name=name, arguments=args), ""


class TagToolCallParser:
    """Parses ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (the strict format).

    A block missing its closing tag at the end of the text is still read (models
    often stop right after the JSON). ``"arguments"`` may be an object or a string
    holding JSON; ``"parameters"`` is accepted as a synonym. Text without
    ``<tool_call>`` is a final answer, whatever else it holds.
    """

    def parse(self, text: str) -> tuple[list[ToolCall], list[str]]:
        """Return ``(calls, errors)``: one entry in either list per ``<tool_call>`` block."""
        calls: list[ToolCall] = []
        errors: list[str] = []
        if "<tool_call>" not in text:
            return calls, errors
        for m in _TOOL_CALL_RE.finditer(text):
            call, error = self._parse_one(m.group(1).strip())
            if call is not None:
                calls.append(call)
            else:
                errors.append(error)
        return calls, errors

    @staticmethod
    def _parse_one(body: str) -> tuple[ToolCall | None, str]:
        obj, why = _loads(body)
        if why:
            return None, f"malformed tool call: the text inside <tool_call> is not valid JSON ({why}); {_TAG_HINT}"
        return _call_from_object(obj, _TAG_HINT)


# A fenced block: ``` plus an optional language tag, up to the closing ``` (or the end
# of the text: models often stop right after the JSON, as with unclosed tags).
_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_.+-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_JSON_FENCE_LANGUAGES = frozenset({"", "json"})
# Where a bare call object may start after prose: "{" and then one of the call's keys.
_CALL_START_RE = re.compile(r'\{\s*"(?:name|arguments|parameters)"\s*:')
# Bounds the work on long prose full of "{"name": ..." (each try may scan to the end).
_MAX_CALL_STARTS = 16
_NAME_FIELD_RE = re.compile(r'"name"\s*:\s*"([^"\\]{1,200})"')
_ARGUMENTS_KEY_RE = re.compile(r'"(?:arguments|parameters)"\s*:')


class LenientToolCallParser:
    """Reads tool calls in the formats models actually write, not only ``<tool_call>`` tags.

    Accepted, in this order of precedence:

    1. ``<tool_call>`` blocks. If the text has ``<tool_call>`` at all, the
       :class:`TagToolCallParser` decides alone, exactly as in strict mode.
    2. Fenced blocks, ```` ```json ```` or a bare ```` ``` ````, anywhere in the text
       (prose around them is fine), each starting with a call object or a JSON list
       of call objects. Several fences give several calls, in order. Fences with
       another language (```` ```python ````) are never calls.
    3. A bare call object (or list of them) that starts the message, or one that
       ends it after some prose (``I'll use the calculator. {"name": ...}``). As
       with tags, text after the JSON is ignored, except more call objects right
       after it (one per line, as models write several calls); a call object in the
       middle of prose is not a call.

    A *call object* is a JSON object whose ``"name"`` is one of ``tool_names`` (with
    ``tool_names=None``, any name, but then the object must also have an
    ``"arguments"`` or ``"parameters"`` key). ``"arguments"`` may be an object or a
    string holding JSON, as with tags. JSON whose ``"name"`` is not a known tool, or
    that has no ``"name"``, is not a call: ``{"answer": 5}``, ``{"name": "Alice"}``
    and code fences stay final answers. A list counts only if every item is a call
    object.

    **Broken JSON** is a malformed call (an error the model sees, with the format
    penalty) only where it clearly targets a tool: a JSON fence, or a message that
    starts with ``{`` or ``[``, that does not decode but contains ``"name": "<tool>"``
    for a known tool (with ``tool_names=None``: any name plus an ``"arguments"`` or
    ``"parameters"`` key). Anything else that does not decode is prose, i.e. part
    of a final answer; in particular a sentence followed by broken JSON stays a
    final answer: there the object cannot be delimited reliably, and a final answer
    that merely quotes a call must not be penalised as a broken one.

    Args:
        tool_names: The tools the env offers; None accepts any name (see above).
    """

    def __init__(self, tool_names: Collection[str] | None = None) -> None:
        if tool_names is not None and (
            isinstance(tool_names, str) or not all(isinstance(n, str) for n in tool_names)
        ):
            raise TypeError(
                f"tool_names must be a collection of tool-name strings or None, got {tool_names!r}; "
                "pass e.g. env.tools.keys()"
            )
        self.tool_names: frozenset[str] | None = frozenset(tool_names) if tool_names is not None else None
        self._tags = TagToolCallParser()

    def parse(self, text: str) -> tuple[list[ToolCall], list[str]]:
        """Return ``(calls, errors)``; both empty means ``text`` is a final answer."""
        if "<tool_call>" in text:
            return self._tags.parse(text)
        calls: list[ToolCall] = []
        errors: list[str] = []
        if "```" in text:
            for m in _FENCE_RE.finditer(text):
                if m.group(1).lower() in _JSON_FENCE_LANGUAGES:
                    self._read_block(m.group(2).strip(), "the fenced block", calls, errors)
            if calls or errors:
                return calls, errors
        stripped = text.strip()
        if stripped.startswith(("{", "[")):
            self._read_block(stripped, "the message", calls, errors)
            return calls, errors
        # Prose, then a call object that ends the message.
        for i, m in enumerate(_CALL_START_RE.finditer(stripped)):
            if i == _MAX_CALL_STARTS:
                break
            value, end, why = _decode_json(stripped, m.start())
            if not why and end == len(stripped) and self._is_call_object(value):
                return self._read_value(value)
        return calls, errors

    def _read_block(self, body: str, where: str, calls: list[ToolCall], errors: list[str]) -> None:
        """Add the calls (or the malformed-call error) of the JSON value ``body`` starts with.

        Adds nothing if that value is not a call; text after it is ignored.
        """
        if not body.startswith(("{", "[")):
            return
        value, end, why = _decode_json(body)
        if why:
            if self._mentions_tool(body):
                errors.append(f"malformed tool call: {where} is not valid JSON ({why}); {_TAG_HINT}")
            return
        found_calls, found_errors = self._read_value(value)
        # Several calls are often written one object per line, without a list around them.
        while found_calls or found_errors:
            calls += found_calls
            errors += found_errors
            rest = body[end:].lstrip()
            # Objects one per line, or separated by commas as in a list without brackets.
            rest = rest[1:].lstrip() if rest.startswith(",") else rest
            start = len(body) - len(rest)
            if not rest.startswith("{"):
                break
            value, end, why = _decode_json(body, start)
            if why:
                break
            found_calls, found_errors = self._read_value(value) if isinstance(value, dict) else ([], [])

    def _read_value(self, value: object) -> tuple[list[ToolCall], list[str]]:
        """Calls and errors of a decoded value: a call object, or a list made only of call objects."""
        items = value if isinstance(value, list) else [value]
        if not items or not all(self._is_call_object(item) for item in items):
            return [], []
        calls: list[ToolCall] = []
        errors: list[str] = []
        for item in items:
            call, error = _call_from_object(item, _TAG_HINT)
            if call is not None:
                calls.append(call)
            else:
                errors.append(error)
        return calls, errors

    def _is_tool_name(self, name: object, has_arguments: bool) -> bool:
        if not isinstance(name, str):
            return False
        return has_arguments if self.tool_names is None else name in self.tool_names

    def _is_call_object(self, value: object) -> bool:
        return isinstance(value, dict) and self._is_tool_name(
            value.get("name"), "arguments" in value or "parameters" in value
        )

    def _mentions_tool(self, text: str) -> bool:
        """Whether undecodable JSON clearly targets a tool: ``"name": "<known tool>"`` in it."""
        has_arguments = _ARGUMENTS_KEY_RE.search(text) is not None
        return any(self._is_tool_name(m.group(1), has_arguments) for m in _NAME_FIELD_RE.finditer(text))


def _make_tag_parser(tool_names: Collection[str]) -> ToolCallParser:
    """The strict parser reads any name; the env checks names when it runs the call."""
    return TagToolCallParser()


#: Named parsers for ``ToolEnv(parser=...)``, each built from the env's tool names.
TOOL_CALL_PARSERS: Mapping[str, Callable[[Collection[str]], ToolCallParser]] = types.MappingProxyType({
    "auto": LenientToolCallParser,  # tags, JSON fences, or a bare JSON call to a known tool
    "tags": _make_tag_parser,  # only <tool_call> blocks (strict)
})
