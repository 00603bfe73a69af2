"""An OpenAI-compatible ``/v1/chat/completions`` endpoint that records token-exact Trajectories.

Agent code written against the OpenAI client (its own loop, or an agent SDK) becomes a
rollout source: point it at :attr:`OpenAIEndpoint.base_url` with the **session key as the
API key** (``OpenAI(base_url=ep.base_url, api_key=key)``, or ``OPENAI_BASE_URL`` /
``OPENAI_API_KEY`` in its environment). Every request of one key belongs to one
session; :meth:`OpenAIEndpoint.finish` turns the session into Trajectories.

Per request the endpoint renders ``messages`` (+ ``tools``) with the policy's chat
template and the generation prompt, samples with the backend (the request's sampling
fields, else the endpoint's defaults), reads tool calls out of the completion with
taurl's parser (:data:`~taurl.envs.tool_parsing.TOOL_CALL_PARSERS`, ``"auto"`` by default,
as :class:`~taurl.envs.base.ToolEnv`) and answers with ``choices[0].message`` holding
``content`` and ``tool_calls`` and ``finish_reason`` ``"tool_calls"``, ``"stop"`` or
``"length"``. Only ``n=1`` and non-streaming requests are served. How requests and
replies map to template messages is in :mod:`taurl.rollout.openai_messages`; the
HTTP/1.1 plumbing is in :mod:`taurl.rollout.http_json`.

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
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Self

from taurl.agents.backend import BackgroundLoop, ContextLengthError, InferenceBackend
from taurl.agents.chat import ChatRenderer
from taurl.agents.loop import derive_seed
from taurl.envs.tool_parsing import TOOL_CALL_PARSERS, ToolCall
from taurl.errors import ConfigError, TaurlError
from taurl.rollout.http_json import JSONServer, RequestError, read_json_object
from taurl.rollout.openai_messages import (
    ReplyKey,
    assistant_reply,
    chat_completion,
    check_tools,
    sampling_params,
    template_messages,
)
from taurl.types import JSONValue, Message, SamplingParams, Termination, Trajectory

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class EndpointError(TaurlError):
    """A session key the endpoint does not know, or an endpoint used after ``close``."""


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
    replies: dict[ReplyKey, str] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)




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
        self._http: JSONServer | None = None

    # -- lifetime ------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``: the OpenAI client's ``base_url``."""
        if self._http is None:
            raise EndpointError("the endpoint is not started; use it as a context manager or call start()")
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> Self:
        """Start listening (on a thread of its own). Returns self."""
        if self._bg is None:
            self._bg = BackgroundLoop("taurl-openai-endpoint")
            http = JSONServer(self._route)
            self.port = self._bg.run_sync(http.start(self.host, self.port))
            self._http = http
        return self

    def close(self) -> None:
        """Stop listening and close open connections. Idempotent."""
        if self._bg is None:
            return
        if self._http is not None:
            self._bg.run_sync(self._http.close())
        self._bg.stop()
        self._bg, self._http = None, None

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

    async def _route(self, method: str, path: str, headers: dict[str, str],
                     body: bytes) -> tuple[int, dict[str, JSONValue]]:
        path = path.rstrip("/")
        if path in ("/v1/models", "/models") and method == "GET":
            return 200, {"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": 0, "owned_by": "taurl"}]}
        if path not in ("/v1/chat/completions", "/chat/completions"):
            raise RequestError(404, f"no route {method} {path}; this endpoint serves POST "
                               "/v1/chat/completions and GET /v1/models", code="not_found")
        if method != "POST":
            raise RequestError(405, f"{path} takes POST, got {method}")
        auth = headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not key:
            raise RequestError(401, "no session key: pass it as the API key (Authorization: Bearer "
                               "<session key>, i.e. OPENAI_API_KEY)", kind="authentication_error",
                               code="invalid_api_key")
        request = read_json_object(body)
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = Session(id=key)
        async with session.lock:
            try:
                return 200, await self._complete(session, request)
            except RequestError as e:
                session.errors.append(f"{e.status}: {e.message}")
                raise
            except Exception as e:  # one request's fault is answered, not fatal
                session.errors.append(f"500: {type(e).__name__}: {e}")
                raise RequestError(500, f"{type(e).__name__}: {e}", kind="server_error") from e

    # -- chat completions ------------------------------------------------------------

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
        default_seed = None if session.sample_seed is None else derive_seed(session.sample_seed, session.requests)
        sampling = sampling_params(request, self.sampling, default_seed)
        openai_tools = check_tools(request.get("tools"))
        template = template_messages(request.get("messages"), session.replies,
                                     supports_tools=self.renderer.supports_tools)
        messages, tools = self.renderer.prepare(template, openai_tools)
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
            raise RequestError(400, str(e), param="messages", code="context_length_exceeded") from e
        session.generate_s += time.perf_counter() - t0
        if gen.finish_reason == "abort" or not gen.token_ids:
            raise RequestError(503, f"the backend returned finish_reason={gen.finish_reason!r} with "
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
        stopped_on_string = gen.finish_reason == "stop" and not ended_with_eos
        message, reply_key = assistant_reply(raw, calls, sampling.stop if stopped_on_string else ())
        session.replies[reply_key] = raw
        seg.tool_calls += len(calls)
        finish = "length" if gen.finish_reason == "length" else "tool_calls" if calls else "stop"
        session.messages = [*request["messages"], message]  # type: ignore[list-item]
        prompt_tokens = len(seg.token_ids) - len(gen.token_ids)
        return chat_completion(self.model_name, message, finish, prompt_tokens, len(gen.token_ids))

