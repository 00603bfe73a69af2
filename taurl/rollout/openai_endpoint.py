"""An OpenAI-compatible ``/v1/chat/completions`` endpoint that records token-exact Trajectories.

Agent code written against the OpenAI client (its own loop, or an agent SDK) becomes a
rollout source: point it at :attr:`OpenAIEndpoint.base_url` with the **session key as the
API key** (``OpenAI(base_url=ep.base_url, api_key=key)``, or ``OPENAI_BASE_URL`` /
``OPENAI_API_KEY`` in its environment). Every request of one key belongs to one
session; :meth:`OpenAIEndpoint.finish` turns the session into Trajectories.

Per request the endpoint renders ``messages`` (+ ``tools``) with the policy's chat
template and the generation prompt, samples with the backend (``temperature``,
``top_p``, ``max_tokens`` / ``max_completion_tokens``, ``stop``, ``seed`` from the
request, else the endpoint's defaults), reads tool calls out of the completion with
taurl's parser (:data:`~taurl.envs.tool_parsing.TOOL_CALL_PARSERS`, ``"auto"`` by default,
as :class:`~taurl.envs.base.ToolEnv`) and answers with ``choices[0].message`` holding
``content`` and ``tool_calls`` and ``finish_reason`` ``"tool_calls"``, ``"stop"`` or
``"length"``. Only ``n=1`` and non-streaming requests are served. Templates without
tools support get the tools described in the system message and ``role: "tool"``
results as one user message of ``<tool_response>`` blocks, exactly as ToolEnv renders
them, so the model sees the format taurl's environments train it on.

**Token-exact recording.** A session is a list of *segments*, each one token stream
(one Trajectory). A request *extends* a segment when its messages start with that
segment's conversation — the assistant messages this endpoint returned are mapped back
to the exact sampled text (by their tool-call ids, else their content) — and the
template renders the new messages as pure appended text. Then only that text (closing
of the last turn, the new messages, the generation prompt) is tokenized and appended
with ``loss_mask`` 0, and the sampled ids follow unchanged with ``loss_mask`` 1 and the
sampler's log-probs, as in :mod:`taurl.agents.loop`. The policy is prompted with exactly
that stream. A request that extends no segment — the agent rewrote or dropped history,
changed its tools, or the template is not prefix-preserving — starts a new segment
prompted with the full rendering of its messages; the reason is kept in
``info["segment_break"]`` of that segment's Trajectory. Each segment's Trajectory also
carries the drift check of :meth:`~taurl.agents.chat.ChatRenderer.check_drift` in
``info["drift"]``.

**Rewards.** ``finish(key, reward)`` (or the endpoint's ``reward_fn(session)``) gives the
episode's reward; it goes to the last turn of every segment (the other turns get 0), and
the segments share one ``group_id``, so a session split by history rewrites is several
trajectories of the same episode, each with the episode's outcome.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Self

from taurl.agents.backend import BackgroundLoop, ContextLengthError, InferenceBackend
from taurl.agents.chat import ChatRenderer
from taurl.agents.loop import derive_seed
from taurl.envs.tool_parsing import TOOL_CALL_PARSERS, ToolCall
from taurl.errors import ConfigError, TaurlError
from taurl.types import JSONValue, Message, SamplingParams, Termination, Trajectory

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_ROLES = ("system", "developer", "user", "assistant", "tool")
_TOOL_CALL_BLOCK_RE = re.compile(r"<tool_call>.*?(?:</tool_call>|$)", re.DOTALL)
_MAX_BODY_BYTES = 64 * 2**20


class EndpointError(TaurlError):
    """A session key the endpoint does not know, or an endpoint used after ``close``."""


class _RequestError(Exception):
    """A request the endpoint answers with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, JSONValue]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass
class _Segment:
    """One token stream of a session (one Trajectory)."""

    token_ids: list[int] = field(default_factory=list)  # [T]
    loss_mask: list[int] = field(default_factory=list)  # [T] 1 on sampled tokens
    logprobs: list[float] = field(default_factory=list)  # [T] 0.0 off sampled tokens
    turn_ids: list[int] = field(default_factory=list)  # [T] -1 prompt, h turn h and its bridge
    messages: list[Message] = field(default_factory=list)  # template messages incl. the last reply
    tools: list[dict[str, JSONValue]] | None = None  # the render ``tools`` argument
    last: tuple[list[Message], str, bool] = ([], "", True)  # (before, content, ended_with_eos)
    turns: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    tool_calls: int = 0
    break_reason: str | None = None  # why this segment started (None: the session's first)

    def append(self, ids: list[int], turn: int, logprobs: list[float] | None = None) -> None:
        self.token_ids.extend(ids)
        self.turn_ids.extend([turn] * len(ids))
        self.loss_mask.extend([0 if logprobs is None else 1] * len(ids))
        self.logprobs.extend([0.0] * len(ids) if logprobs is None else logprobs)


@dataclass
class Session:
    """What one session key did: read by reward functions, turned into Trajectories by ``finish``."""

    id: str  # the session key (the client's API key)
    sample_seed: int | None = None  # base of per-request seeds for requests without ``seed``
    messages: list[Message] = field(default_factory=list)  # last request's messages + its reply (OpenAI form)
    requests: int = 0  # requests served
    errors: list[str] = field(default_factory=list)  # requests answered with an error
    generate_s: float = 0.0  # seconds spent sampling
    segments: list[_Segment] = field(default_factory=list)
    # the exact sampled text of each reply, by ("calls", ids) or ("content", content)
    replies: dict[tuple[str, ...], str] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _text_of(content: object, where: str) -> str:
    """A message's content as one string (text parts joined); anything else is a 400."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _RequestError(400, f"{where}: only text content parts are served, got {part!r}",
                                    param=where)
            parts.append(part["text"])
        return "".join(parts)
    raise _RequestError(400, f"{where}: content must be a string, a list of text parts or null, "
                        f"got {type(content).__name__}", param=where)


def _tool_call_text(call: dict[str, JSONValue], where: str) -> tuple[str, str]:
    """``(id, "<tool_call>…</tool_call>")`` of an OpenAI tool call object in a request."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _RequestError(400, f"{where}: expected {{'id', 'type': 'function', 'function': "
                            f"{{'name', 'arguments'}}}}, got {call!r}", param=where)
    args = fn.get("arguments") or "{}"
    try:
        parsed = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        parsed = args
    body = json.dumps({"name": fn["name"], "arguments": parsed}, ensure_ascii=False)
    return str(call.get("id", "")), f"<tool_call>\n{body}\n</tool_call>"


def _check_tools(tools: object) -> list[dict[str, JSONValue]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _RequestError(400, f"'tools' must be a list, got {type(tools).__name__}", param="tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str)):
            raise _RequestError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name', "
                                f"'description', 'parameters'}}}}, got {tool!r}", param=f"tools[{i}]")
    return tools


class OpenAIEndpoint:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that records each session token-exactly.

    Use it as a context manager, sync or async; the server runs on its own thread, so a
    blocking OpenAI client may call it from the thread that opened it::

        with OpenAIEndpoint(backend, tokenizer) as ep:
            client = openai.OpenAI(base_url=ep.base_url, api_key="episode-1")
            ...  # the agent's own loop
            trajectories = ep.finish_sync("episode-1", reward=1.0)

    Args:
        backend: Samples every request; shared by all sessions.
        tokenizer: The policy's tokenizer; its chat template renders the requests.
        sampling: Defaults for what a request does not say (``max_tokens``,
            ``temperature``, ``top_p``, ``top_k``, ``stop``).
        parser: Tool-call format read from completions, a key of ``TOOL_CALL_PARSERS``.
        reward_fn: The reward of a session when ``finish`` is given none.
        model_name: The model id reported by ``/v1/models`` and in responses.
        drift_check: Store the drift check of each Trajectory in ``info["drift"]``.
        host, port: Where to listen; port 0 picks a free one.
    """

    def __init__(
        self,
        backend: InferenceBackend,
        tokenizer: PreTrainedTokenizerBase,
        *,
        sampling: SamplingParams | None = None,
        parser: str = "auto",
        reward_fn: Callable[[Session], float] | None = None,
        model_name: str = "taurl-policy",
        drift_check: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if parser not in TOOL_CALL_PARSERS:
            raise ConfigError(f"unknown tool-call parser {parser!r}; expected one of {sorted(TOOL_CALL_PARSERS)}")
        self.backend = backend
        self.renderer = ChatRenderer(tokenizer)
        self.sampling = sampling or SamplingParams()
        self.parser = parser
        self.reward_fn = reward_fn
        self.model_name = model_name
        self.drift_check = drift_check
        self.host, self.port = host, port
        self.sessions: dict[str, Session] = {}
        self._bg: BackgroundLoop | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # -- lifetime ------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``: the OpenAI client's ``base_url``."""
        if self._server is None:
            raise EndpointError("the endpoint is not started; use it as a context manager or call start()")
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> Self:
        """Start listening (on a thread of its own). Returns self."""
        if self._bg is None:
            self._bg = BackgroundLoop("taurl-openai-endpoint")
            self._server = self._bg.run_sync(self._listen())
        return self

    async def _listen(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve_connection, self.host, self.port, limit=2**20)
        self.port = server.sockets[0].getsockname()[1]
        return server

    def close(self) -> None:
        """Stop listening and close open connections. Idempotent."""
        if self._bg is None:
            return
        self._bg.run_sync(self._shutdown())
        self._bg.stop()
        self._bg, self._server = None, None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    # -- sessions ------------------------------------------------------------------

    def new_session(self, prefix: str = "taurl", *, sample_seed: int | None = None) -> str:
        """A fresh session key (to pass as the API key), registered with ``sample_seed``.

        A key the endpoint never handed out is also served: its session starts on its
        first request.
        """
        key = f"{prefix}-{uuid.uuid4().hex}"
        self.sessions[key] = Session(id=key, sample_seed=sample_seed)
        return key

    async def finish(
        self,
        session_id: str,
        reward: float | None = None,
        *,
        termination: Termination = "terminated",
        success: bool | None = None,
        group_id: str = "",
        env_id: str = "",
        task_id: str = "",
        seed: int | None = None,
        info: dict[str, JSONValue] | None = None,
    ) -> list[Trajectory]:
        """End a session: one Trajectory per segment (usually one), in order.

        ``reward`` (default: ``reward_fn(session)``) goes to the last turn of each
        segment. Waits for the session's request in flight. A session that made no
        request gives no Trajectory.
        """
        if self._bg is None:
            raise EndpointError("the endpoint is closed; finish sessions before closing it")
        return await self._bg.run(self._finish(session_id, reward, termination, success, group_id,
                                               env_id, task_id, seed, info or {}))

    def finish_sync(
        self, session_id: str, reward: float | None = None, *, termination: Termination = "terminated",
        success: bool | None = None, group_id: str = "", env_id: str = "", task_id: str = "",
        seed: int | None = None, info: dict[str, JSONValue] | None = None,
    ) -> list[Trajectory]:
        """:meth:`finish` for code without an event loop."""
        if self._bg is None:
            raise EndpointError("the endpoint is closed; finish sessions before closing it")
        return self._bg.run_sync(self._finish(session_id, reward, termination, success, group_id,
                                              env_id, task_id, seed, info or {}))

    async def _finish(self, session_id: str, reward: float | None, termination: Termination,
                      success: bool | None, group_id: str, env_id: str, task_id: str,
                      seed: int | None, info: dict[str, JSONValue]) -> list[Trajectory]:
        session = self.sessions.get(session_id)
        if session is None:
            raise EndpointError(f"no session {session_id!r}; a session starts with its first request "
                                "(or new_session()) and ends with its first finish()")
        async with session.lock:
            del self.sessions[session_id]
        if reward is None:
            if self.reward_fn is None:
                raise EndpointError("finish() got no reward and the endpoint has no reward_fn")
            reward = float(self.reward_fn(session))
        out = []
        for i, seg in enumerate(session.segments):
            rewards = [0.0] * (seg.turns - 1) + [float(reward)]
            seg_info: dict[str, JSONValue] = {
                **info, "session_id": session_id, "segment": i, "segments": len(session.segments),
                "segment_break": seg.break_reason, "requests": session.requests,
                "request_errors": list(session.errors), "finish_reasons": list(seg.finish_reasons),
                "tool_calls": seg.tool_calls,
            }
            if self.drift_check:
                before, content, eos = seg.last
                closing = self.renderer.bridge(before, content, eos, [], add_generation_prompt=False,
                                               tools=seg.tools).token_ids
                seg_info["drift"] = self.renderer.check_drift(
                    seg.token_ids, seg.messages, closing, tools=seg.tools).to_dict()
            out.append(Trajectory(
                token_ids=seg.token_ids, loss_mask=seg.loss_mask, logprobs=seg.logprobs,
                turn_ids=seg.turn_ids, rewards=rewards, episode_return=float(sum(rewards)),
                termination=termination, env_id=env_id, task_id=task_id, seed=seed,
                group_id=group_id, policy_version=int(self.backend.policy_version),
                success=success, messages=seg.messages,
                timing={"generate_s": session.generate_s}, info=seg_info,
            ))
        return out

    # -- HTTP ----------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                keep_alive = headers.get("connection", "").lower() != "close"
                try:
                    if len(parts) != 3:
                        raise _RequestError(400, f"malformed HTTP request line {lines[0]!r}")
                    if "chunked" in headers.get("transfer-encoding", "").lower():
                        raise _RequestError(411, "send the body with a Content-Length, not chunked")
                    size = int(headers.get("content-length", "0") or 0)
                    if not 0 <= size <= _MAX_BODY_BYTES:
                        raise _RequestError(413, f"the body has {size} bytes; at most {_MAX_BODY_BYTES} are read")
                    body = await reader.readexactly(size)
                    status, payload = await self._route(parts[0], parts[1].split("?")[0], headers, body)
                except _RequestError as e:
                    status, payload = e.status, e.body()
                    keep_alive = keep_alive and e.status < 411
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                data = json.dumps(payload, ensure_ascii=False).encode()
                reason = HTTPStatus(status).phrase
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}"
                    "\r\n\r\n".encode() + data
                )
                await writer.drain()
                if not keep_alive:
                    return
        except ConnectionError:
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _route(self, method: str, path: str, headers: dict[str, str],
                     body: bytes) -> tuple[int, dict[str, JSONValue]]:
        path = path.rstrip("/")
        if path in ("/v1/models", "/models") and method == "GET":
            return 200, {"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": 0, "owned_by": "taurl"}]}
        if path not in ("/v1/chat/completions", "/chat/completions"):
            raise _RequestError(404, f"no route {method} {path}; this endpoint serves POST "
                                "/v1/chat/completions and GET /v1/models", code="not_found")
        if method != "POST":
            raise _RequestError(405, f"{path} takes POST, got {method}")
        auth = headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not key:
            raise _RequestError(401, "no session key: pass it as the API key (Authorization: Bearer "
                                "<session key>, i.e. OPENAI_API_KEY)", kind="authentication_error",
                                code="invalid_api_key")
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _RequestError(400, f"the body is not valid JSON: {e}") from e
        if not isinstance(request, dict):
            raise _RequestError(400, f"the body must be a JSON object, got {type(request).__name__}")
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = Session(id=key)
        async with session.lock:
            try:
                return 200, await self._complete(session, request)
            except _RequestError as e:
                session.errors.append(f"{e.status}: {e.message}")
                raise
            except Exception as e:  # one request's fault is answered, not fatal
                session.errors.append(f"500: {type(e).__name__}: {e}")
                raise _RequestError(500, f"{type(e).__name__}: {e}", kind="server_error") from e

    # -- chat completions ------------------------------------------------------------

    def _sampling(self, request: dict[str, JSONValue], session: Session) -> SamplingParams:
        if request.get("stream"):
            raise _RequestError(400, "stream=true is not served; call without streaming", param="stream")
        if request.get("n", 1) not in (1, None):
            raise _RequestError(400, f"only n=1 is served, got n={request['n']!r}", param="n")
        base = self.sampling
        stop = request.get("stop")
        stop_t = base.stop if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)  # type: ignore[arg-type]
        max_tokens = request.get("max_completion_tokens") or request.get("max_tokens") or base.max_tokens
        seed = request.get("seed")
        if seed is None and session.sample_seed is not None:
            seed = derive_seed(session.sample_seed, session.requests)
        try:
            return SamplingParams(
                max_tokens=int(max_tokens),  # type: ignore[arg-type]
                temperature=float(base.temperature if request.get("temperature") is None else request["temperature"]),  # type: ignore[arg-type]
                top_p=float(base.top_p if request.get("top_p") is None else request["top_p"]),  # type: ignore[arg-type]
                top_k=base.top_k, stop=stop_t, seed=None if seed is None else int(seed),  # type: ignore[arg-type]
            )
        except (ConfigError, TypeError, ValueError) as e:
            raise _RequestError(400, f"bad sampling parameter: {e}") from e

    def _template_messages(self, session: Session, messages: object) -> list[Message]:
        """The request's messages as the chat template renders them (see the module docstring)."""
        if not isinstance(messages, list) or not messages:
            raise _RequestError(400, "'messages' must be a non-empty list of messages", param="messages")
        out: list[Message] = []
        tool_blocks: list[str] = []

        def flush_tools() -> None:
            if tool_blocks:
                out.append({"role": "user", "content": "\n".join(tool_blocks)})
                tool_blocks.clear()

        for i, msg in enumerate(messages):
            where = f"messages[{i}]"
            role = msg.get("role") if isinstance(msg, dict) else None
            if role not in _ROLES:
                raise _RequestError(400, f"{where} must be an object with a 'role' in {_ROLES}, got {msg!r}",
                                    param=where)
            content = _text_of(msg.get("content"), where)
            if role == "tool" and not self.renderer.supports_tools:
                tool_blocks.append(f"<tool_response>\n{content}\n</tool_response>")
                continue
            flush_tools()
            if role == "assistant":
                calls = msg.get("tool_calls") or []
                if not isinstance(calls, list):
                    raise _RequestError(400, f"{where}.tool_calls must be a list", param=where)
                texts = [_tool_call_text(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
                key = ("calls", *[t[0] for t in texts]) if texts else ("content", content)
                raw = session.replies.get(key)
                if raw is None:
                    raw = "\n".join([content, *(t[1] for t in texts)]) if content else "\n".join(t[1] for t in texts)
                out.append({"role": "assistant", "content": raw})
            else:
                out.append({"role": "system" if role == "developer" else role, "content": content})
        flush_tools()
        return out

    def _extend(self, seg: _Segment, messages: list[Message],
                tools: list[dict[str, JSONValue]] | None) -> tuple[list[int] | None, str]:
        """The bridge tokens with which ``messages`` extend ``seg``, or ``(None, why not)``."""
        n = len(seg.messages)
        if tools != seg.tools:
            return None, "the request's tools differ from the segment's"
        for i, (a, b) in enumerate(zip(seg.messages, messages, strict=False)):
            if a != b:
                return None, f"message {i} differs from the one the segment was rendered with (history rewritten)"
        if len(messages) <= n:
            return None, f"the request has {len(messages)} messages, not more than the segment's {n}"
        before, content, eos = seg.last
        try:
            bridge = self.renderer.bridge(before, content, eos, messages[n:], tools=tools)
        except ValueError as e:
            return None, str(e)
        if bridge.method != "diff":
            return None, "the chat template renders the earlier turns differently (not prefix-preserving)"
        return bridge.token_ids, ""

    async def _complete(self, session: Session, request: dict[str, JSONValue]) -> dict[str, JSONValue]:
        sampling = self._sampling(request, session)
        openai_tools = _check_tools(request.get("tools"))
        messages, tools = self.renderer.prepare(self._template_messages(session, request.get("messages")),
                                                openai_tools)
        seg: _Segment | None = None
        bridge: list[int] = []
        why = ""
        for candidate in reversed(session.segments):
            ids, reason = self._extend(candidate, messages, tools)
            if ids is not None:
                seg, bridge = candidate, ids
                break
            why = why or reason
        if seg is None:
            prompt = self.renderer.prompt_ids(messages, tools)
            segment_index = len(session.segments)
        else:
            prompt = [*seg.token_ids, *bridge]
            segment_index = session.segments.index(seg)
        t0 = time.perf_counter()
        try:
            gen = await self.backend.generate(prompt, sampling, session_id=f"{session.id}/{segment_index}")
        except ContextLengthError as e:
            raise _RequestError(400, str(e), param="messages", code="context_length_exceeded") from e
        session.generate_s += time.perf_counter() - t0
        if gen.finish_reason == "abort" or not gen.token_ids:
            raise _RequestError(503, f"the backend returned finish_reason={gen.finish_reason!r} with "
                                f"{len(gen.token_ids)} tokens", kind="server_error")
        if seg is None:
            seg = _Segment(tools=tools, break_reason=why or None)
            seg.append(prompt, -1)
            session.segments.append(seg)
        else:
            seg.append(bridge, seg.turns - 1)
        seg.append(gen.token_ids, seg.turns, gen.logprobs)
        ended_with_eos = gen.token_ids[-1] == self.renderer.eos_token_id
        raw = self.renderer.assistant_content(gen.token_ids)
        seg.last = (messages, raw, ended_with_eos)
        seg.messages = [*messages, {"role": "assistant", "content": raw}]
        seg.turns += 1
        seg.finish_reasons.append(gen.finish_reason)
        session.requests += 1

        calls: list[ToolCall] = []
        if openai_tools and request.get("tool_choice") != "none":
            names = [t["function"]["name"] for t in openai_tools]  # type: ignore[index]
            calls, _ = TOOL_CALL_PARSERS[self.parser](names).parse(raw)
        content: str | None = raw
        if gen.finish_reason == "stop" and not ended_with_eos:
            for s in sampling.stop:
                if content.endswith(s):
                    content = content[: -len(s)]
                    break
        tool_calls: list[dict[str, JSONValue]] = []
        if calls:
            seg.tool_calls += len(calls)
            content = _TOOL_CALL_BLOCK_RE.sub("", content).strip() if "<tool_call>" in content else ""
            content = content or None
            turn_tag = f"{uuid.uuid4().hex[:12]}"
            tool_calls = [
                {"id": f"call_{turn_tag}_{i}", "type": "function",
                 "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                for i, c in enumerate(calls)
            ]
            session.replies[("calls", *[str(c["id"]) for c in tool_calls])] = raw
        else:
            session.replies[("content", content or "")] = raw
        message: dict[str, JSONValue] = {"role": "assistant", "content": content}
        if tool_calls:
            message["tool_calls"] = tool_calls  # type: ignore[assignment]
        finish = "length" if gen.finish_reason == "length" else "tool_calls" if tool_calls else "stop"
        session.messages = [*request["messages"], message]  # type: ignore[list-item]
        prompt_tokens = len(seg.token_ids) - len(gen.token_ids)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(gen.token_ids),
                      "total_tokens": prompt_tokens + len(gen.token_ids)},
        }

