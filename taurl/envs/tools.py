"""Tools: typed Python functions as tools, their JSON schemas, and the prompt that describes them.

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
``required``. :func:`format_tool_prompt` describes the schemas to a model whose chat
template has no tools support.

How calls are read from model text is in :mod:`taurl.envs.tool_parsing`; how they
are checked and run, and how results go back, in :mod:`taurl.envs.tool_execution`.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, Union, get_args, get_origin, get_type_hints, runtime_checkable

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
    timeout_s: float | None = None  # per-call limit; None runs inline (see taurl.envs.tool_execution)

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


@runtime_checkable
class Toolset(Protocol):
    """Tools that share something the environment must release: a server process, a connection.

    A :class:`~taurl.envs.base.ToolEnv` given a toolset among its tools offers every
    tool in ``tools`` and calls ``close()`` when it is closed (e.g.
    :class:`~taurl.envs.mcp.MCPToolset`: an MCP server's tools).
    """

    tools: list[Tool]

    def close(self) -> None:
        """Release the shared resource; called once the tools are no longer needed (idempotent)."""


def as_tool(obj: Tool | Callable[..., object]) -> Tool:
    """Return ``obj`` if it is a :class:`Tool`, else ``Tool.from_function(obj)``."""
    return obj if isinstance(obj, Tool) else Tool.from_function(obj)


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
