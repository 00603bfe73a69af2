"""OpenAI chat-completions requests and replies ↔ taurl's chat-template messages.

The stateless half of :mod:`taurl.rollout.openai_endpoint`, kept apart from its
session recording: checking a request's ``messages``, ``tools`` and sampling fields
(``temperature``, ``top_p``, ``max_tokens`` / ``max_completion_tokens``, ``stop``,
``seed``; each fault a 400 :class:`~taurl.rollout.http_json.RequestError` naming the
field), turning the messages into what the chat template renders, and turning a
sampled completion back into an OpenAI ``message`` with ``tool_calls`` and the
``chat.completion`` response.

Templates without tools support get the tools described in the system message (by
:meth:`~taurl.agents.chat.ChatRenderer.prepare`) and ``role: "tool"`` results as one
user message of ``<tool_response>`` blocks, exactly as
:class:`~taurl.envs.base.ToolEnv` renders them, so the model sees the format taurl's
environments train it on. An assistant message
the endpoint returned is mapped back to the exact text it sampled (the ``replies``
map, keyed by :func:`reply_key`), so a conversation that goes on renders the same
tokens; an assistant message the endpoint never wrote gets its tool calls rendered as
``<tool_call>`` blocks.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping

from taurl.envs.tool_parsing import ToolCall
from taurl.errors import ConfigError
from taurl.rollout.http_json import RequestError
from taurl.types import JSONValue, Message, SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
_TOOL_CALL_BLOCK_RE = re.compile(r"<tool_call>.*?(?:</tool_call>|$)", re.DOTALL)

#: Key of a reply in the ``replies`` map: ``("calls", *tool_call_ids)`` or ``("content", content)``.
ReplyKey = tuple[str, ...]


def text_of(content: object, where: str) -> str:
    """A message's content as one string (text parts joined); anything else is a 400."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(400, f"{where}: only text content parts are served, got {part!r}",
                                   param=where)
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(400, f"{where}: content must be a string, a list of text parts or null, "
                       f"got {type(content).__name__}", param=where)


def tool_call_text(call: dict[str, JSONValue], where: str) -> tuple[str, str]:
    """``(id, "<tool_call>…</tool_call>")`` of an OpenAI tool call object in a request."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RequestError(400, f"{where}: expected {{'id', 'type': 'function', 'function': "
                           f"{{'name', 'arguments'}}}}, got {call!r}", param=where)
    args = fn.get("arguments") or "{}"
    try:
        parsed = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        parsed = args
    body = json.dumps({"name": fn["name"], "arguments": parsed}, ensure_ascii=False)
    return str(call.get("id", "")), f"<tool_call>\n{body}\n</tool_call>"


def check_tools(tools: object) -> list[dict[str, JSONValue]]:
    """The request's ``tools`` (``[]`` when absent), each checked to be a function tool."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RequestError(400, f"'tools' must be a list, got {type(tools).__name__}", param="tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str)):
            raise RequestError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name', "
                               f"'description', 'parameters'}}}}, got {tool!r}", param=f"tools[{i}]")
    return tools


def sampling_params(request: dict[str, JSONValue], base: SamplingParams,
                    default_seed: int | None) -> SamplingParams:
    """The request's sampling settings; what it does not say comes from ``base``.

    ``default_seed`` is the seed of a request without ``seed``. Streaming and ``n != 1``
    are refused.
    """
    if request.get("stream"):
        raise RequestError(400, "stream=true is not served; call without streaming", param="stream")
    if request.get("n", 1) not in (1, None):
        raise RequestError(400, f"only n=1 is served, got n={request['n']!r}", param="n")
    stop = request.get("stop")
    stop_t = base.stop if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)  # type: ignore[arg-type]
    max_tokens = request.get("max_completion_tokens") or request.get("max_tokens") or base.max_tokens
    seed = request.get("seed")
    if seed is None:
        seed = default_seed
    try:
        return SamplingParams(
            max_tokens=int(max_tokens),  # type: ignore[arg-type]
            temperature=float(base.temperature if request.get("temperature") is None else request["temperature"]),  # type: ignore[arg-type]
            top_p=float(base.top_p if request.get("top_p") is None else request["top_p"]),  # type: ignore[arg-type]
            top_k=base.top_k, stop=stop_t, seed=None if seed is None else int(seed),  # type: ignore[arg-type]
        )
    except (ConfigError, TypeError, ValueError) as e:
        raise RequestError(400, f"bad sampling parameter: {e}") from e


def template_messages(messages: object, replies: Mapping[ReplyKey, str], *,
                      supports_tools: bool) -> list[Message]:
    """The request's messages as the chat template renders them (see the module docstring).

    ``replies`` holds the exact sampled text of the assistant messages the endpoint
    returned; ``supports_tools`` says whether the template renders ``role: "tool"``.
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of messages", param="messages")
    out: list[Message] = []
    tool_blocks: list[str] = []

    def flush_tools() -> None:
        if tool_blocks:
            out.append({"role": "user", "content": "\n".join(tool_blocks)})
            tool_blocks.clear()

    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ROLES:
            raise RequestError(400, f"{where} must be an object with a 'role' in {ROLES}, got {msg!r}",
                               param=where)
        content = text_of(msg.get("content"), where)
        if role == "tool" and not supports_tools:
            tool_blocks.append(f"<tool_response>\n{content}\n</tool_response>")
            continue
        flush_tools()
        if role == "assistant":
            calls = msg.get("tool_calls") or []
            if not isinstance(calls, list):
                raise RequestError(400, f"{where}.tool_calls must be a list", param=where)
            texts = [tool_call_text(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
            key = ("calls", *[t[0] for t in texts]) if texts else ("content", content)
            raw = replies.get(key)
            if raw is None:
                raw = "\n".join([content, *(t[1] for t in texts)]) if content else "\n".join(t[1] for t in texts)
            out.append({"role": "assistant", "content": raw})
        else:
            out.append({"role": "system" if role == "developer" else role, "content": content})
    flush_tools()
    return out


def assistant_reply(raw: str, calls: list[ToolCall], strip_stop: tuple[str, ...]
                    ) -> tuple[dict[str, JSONValue], ReplyKey]:
    """The OpenAI ``message`` of a completion and the :data:`ReplyKey` it will come back under.

    Args:
        raw: The sampled text (the template's assistant content).
        calls: The tool calls parsed out of ``raw``; each gets a fresh ``call_…`` id and
            its ``<tool_call>`` block is removed from ``content``.
        strip_stop: Stop strings to cut from the end of ``content`` (the first that
            matches), for a completion that stopped on one.
    """
    content: str | None = raw
    for s in strip_stop:
        if content.endswith(s):
            content = content[: -len(s)]
            break
    message: dict[str, JSONValue] = {"role": "assistant", "content": content}
    if not calls:
        return message, ("content", content or "")
    content = _TOOL_CALL_BLOCK_RE.sub("", content).strip() if "<tool_call>" in content else ""
    turn_tag = f"{uuid.uuid4().hex[:12]}"
    tool_calls: list[JSONValue] = [
        {"id": f"call_{turn_tag}_{i}", "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
        for i, c in enumerate(calls)
    ]
    message["content"] = content or None
    message["tool_calls"] = tool_calls
    return message, ("calls", *[str(c["id"]) for c in tool_calls])  # type: ignore[index]


def chat_completion(model: str, message: dict[str, JSONValue], finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, JSONValue]:
    """The ``chat.completion`` response object of one reply (one choice, no log-probs)."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
