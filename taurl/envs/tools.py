"""The tool layer: typed Python functions as tools, tool-call parsing, validation, execution.

A tool is a plain Python function with type hints and a Google-style docstring::

    def calculator(expression: str) -> str:
        \"\"\"Evaluate an arithmetic expression.

        Args:
            expression: Arithmetic with + - * / ** and parentheses, e.g. "12 * (3 + 4)".
        \"\"\"

:meth:`Tool.from_function` turns it into an OpenAI-format JSON schema
(``{"type": "function", "function": {"name", "description", "parameters"}}``): the
first docstring paragraph is the description, the ``Args:`` section describes each
parameter, type hints give the JSON types, and parameters without defaults are
``required``.

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

import inspect
import json
import math
import re
import threading
import types
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, Union, get_args, get_origin, get_type_hints

from taurl.errors import ConfigError
from taurl.types import JSONValue

ToolSchema = dict[str, JSONValue]
"""An OpenAI-format tool schema: ``{"type": "function", "function": {...}}``."""

_JSON_TYPES: dict[type, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    tuple: "array",
    dict: "object",
    type(None): "null",
}


def _json_schema_of(tp: object, where: str) -> dict[str, JSONValue]:
    """JSON schema of a Python type hint (str, int, float, bool, None, list[X], dict, Literal, unions)."""
    origin = get_origin(tp)
    if origin is Literal:
        values = list(get_args(tp))
        return {"enum": values}
    if origin in (Union, types.UnionType):
        options = [_json_schema_of(a, where) for a in get_args(tp)]
        if all(set(o) == {"type"} and isinstance(o["type"], str) for o in options):
            return {"type": [o["type"] for o in options]}
        return {"anyOf": options}
    if origin in (list, tuple, Sequence):
        args = get_args(tp)
        schema: dict[str, JSONValue] = {"type": "array"}
        if args:  # tuple[X, ...] and list[X] both describe items of type X
            schema["items"] = _json_schema_of(args[0], where)
        return schema
    if origin in (dict, Mapping):
        return {"type": "object"}
    if isinstance(tp, type) and tp in _JSON_TYPES:
        return {"type": _JSON_TYPES[tp]}
    raise TypeError(
        f"{where}: type hint {tp!r} has no JSON-schema equivalent; use str, int, float, bool, "
        "None, list[...], dict[str, ...], Literal[...] or a union of those"
    )


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into (description, {parameter: description})."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    description: list[str] = []
    params: dict[str, str] = {}
    section = "description"
    current: str | None = None
    for line in lines:
        stripped = line.strip()
        header = stripped.rstrip(":").lower()
        if stripped.endswith(":") and header in {"args", "arguments", "parameters"}:
            section, current = "args", None
            continue
        if stripped.endswith(":") and header in {
            "returns", "return", "raises", "yields", "examples", "example", "note", "notes",
        }:
            section, current = "other", None
            continue
        if section == "description":
            description.append(stripped)
        elif section == "args" and stripped:
            m = re.match(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", stripped)
            if m and line.startswith("    ") and not line.startswith("        "):
                current = m.group(1).lstrip("*")
                params[current] = m.group(2).strip()
            elif current is not None:
                params[current] = (params[current] + " " + stripped).strip()
    text = "\n".join(description).strip()
    first_paragraph = text.split("\n\n")[0].replace("\n", " ").strip()
    return first_paragraph, params


@dataclass(frozen=True)
class Tool:
    """A callable the model may invoke, with its JSON schema.

    Build one with :meth:`from_function`; the fields are public so a tool whose
    schema cannot come from type hints can be written out by hand.
    """

    name: str  # what the model writes in "name"
    description: str  # one paragraph shown to the model
    parameters: dict[str, JSONValue]  # JSON schema of the arguments object
    fn: Callable[..., object]  # called with the validated arguments as keywords
    timeout_s: float | None = None  # per-call limit; None runs inline (see the module docstring)

    @classmethod
    def from_function(
        cls,
        fn: Callable[..., object],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float | None = None,
        examples: Mapping[str, JSONValue] | None = None,
    ) -> Tool:
        """Make a tool from a typed function (bound methods work; ``self`` is skipped).

        Args:
            fn: The function. Every parameter needs a type hint.
            name: Tool name; defaults to ``fn.__name__``.
            description: Overrides the docstring's first paragraph.
            timeout_s: Per-call time limit in seconds, or None for none.
            examples: One example value per parameter name, stored as JSON-schema
                ``"examples"`` and used by :func:`format_tool_prompt` in its sample call.
        """
        tool_name = name or getattr(fn, "__name__", None)
        if not tool_name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", tool_name):
            raise ConfigError(
                f"tool name must be an identifier-like string, got {tool_name!r}; "
                "pass name=... to Tool.from_function"
            )
        if timeout_s is not None and not timeout_s > 0:
            raise ConfigError(f"tool {tool_name!r}: timeout_s must be > 0 or None, got {timeout_s}")
        doc_description, doc_params = _parse_docstring(inspect.getdoc(fn))
        hints = get_type_hints(fn)
        properties: dict[str, JSONValue] = {}
        required: list[JSONValue] = []
        for pname, param in inspect.signature(fn).parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(
                    f"tool {tool_name!r}: *args/**kwargs cannot be described by a JSON schema; "
                    "give every argument its own typed parameter"
                )
            if pname not in hints:
                raise TypeError(
                    f"tool {tool_name!r}: parameter {pname!r} has no type hint; the JSON schema "
                    "is built from type hints, so annotate it (e.g. `{pname}: str`)"
                )
            prop = _json_schema_of(hints[pname], f"tool {tool_name!r}, parameter {pname!r}")
            if pname in doc_params:
                prop["description"] = doc_params[pname]
            if examples and pname in examples:
                prop["examples"] = [examples[pname]]
            if param.default is inspect.Parameter.empty:
                required.append(pname)
            elif isinstance(param.default, (str, int, float, bool, type(None))):
                prop["default"] = param.default
            properties[pname] = prop
        unknown = set(examples or {}) - set(properties)
        if unknown:
            raise ConfigError(
                f"tool {tool_name!r}: examples name unknown parameters {sorted(unknown)}; "
                f"parameters are {sorted(properties)}"
            )
        parameters: dict[str, JSONValue] = {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
        }
        return cls(
            name=tool_name,
            description=description if description is not None else doc_description,
            parameters=parameters,
            fn=fn,
            timeout_s=timeout_s,
        )

    @property
    def schema(self) -> ToolSchema:
        """The OpenAI-format schema: ``{"type": "function", "function": {...}}``."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


def as_tool(obj: Tool | Callable[..., object]) -> Tool:
    """Return ``obj`` if it is a :class:`Tool`, else ``Tool.from_function(obj)``."""
    return obj if isinstance(obj, Tool) else Tool.from_function(obj)


# -- parsing ---------------------------------------------------------------------------


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


# -- prompt ----------------------------------------------------------------------------

_PLACEHOLDERS: dict[str, JSONValue] = {
    "string": "...", "integer": 1, "number": 1.0, "boolean": True, "array": [], "object": {},
}


def _example_arguments(schema: Mapping[str, JSONValue]) -> dict[str, JSONValue]:
    props = schema.get("properties", {})
    required = schema.get("required", [])
    out: dict[str, JSONValue] = {}
    for name, prop in props.items():  # type: ignore[union-attr]
        if name not in required:  # type: ignore[operator]
            continue
        if prop.get("examples"):
            out[name] = prop["examples"][0]
        elif "enum" in prop:
            out[name] = prop["enum"][0]
        else:
            t = prop.get("type", "string")
            out[name] = _PLACEHOLDERS.get(t if isinstance(t, str) else t[0], "...")
    return out


def format_tool_prompt(tool_schemas: Sequence[ToolSchema]) -> str:
    """The system-prompt text that describes tools to a model whose chat template has no tools support.

    The text lists each schema as one JSON line inside ``<tools></tools>``, shows a
    sample call to the first tool (using the parameters' ``"examples"`` when given)
    and states the rules: calls go in ``<tool_call></tool_call>``, results come back
    in ``<tool_response></tool_response>``, the final answer is a message without a
    tool call, with the answer inside ``<answer></answer>``.

    Args:
        tool_schemas: OpenAI-format schemas, e.g. ``info["tools"]`` from ``reset``.
    """
    if not tool_schemas:
        return "Put your final answer inside <answer></answer> tags."
    lines = "\n".join(json.dumps(s, ensure_ascii=False) for s in tool_schemas)
    first = tool_schemas[0]["function"]
    example = json.dumps(
        {"name": first["name"], "arguments": _example_arguments(first.get("parameters", {}))},  # type: ignore[union-attr, index, arg-type]
        ensure_ascii=False,
    )
    return (
        "You can call tools. The tools are described by these JSON schemas:\n"
        f"<tools>\n{lines}\n</tools>\n\n"
        "To call a tool, write its name and arguments as JSON inside <tool_call></tool_call> "
        f"tags, for example:\n<tool_call>\n{example}\n</tool_call>\n"
        "The result comes back in the next message inside <tool_response></tool_response> tags. "
        "When you know the final answer, reply without any tool call and put the answer "
        "inside <answer></answer> tags."
    )


def final_answer(answer: str | float) -> str:
    """Submit your final answer; this ends the task. Call it once you know the answer.

    Args:
        answer: The final answer, e.g. "42".
    """
    return format_number(answer) if isinstance(answer, (int, float)) else answer


def format_number(value: float) -> str:
    """``19`` for integral values, else up to 10 significant digits (``0.3333333333``)."""
    if isinstance(value, int) or (math.isfinite(value) and float(value).is_integer() and abs(value) < 1e16):
        return str(int(value))
    return f"{value:.10g}"


FINAL_ANSWER_TOOL = Tool.from_function(final_answer)
"""The ``final_answer`` tool of :class:`~taurl.envs.base.ToolEnv` (``answer_tool=True``)."""
