"""The token-exact agent loop: one episode of an environment → one :class:`Trajectory`.

Per turn ``h`` the agent sends the token stream so far to the backend, appends the
sampled token ids unchanged (``loss_mask`` 1, the sampler's log-probs stored), steps
the environment with the decoded text, and appends only the *bridge* — the turn's
closing, the new observation and the next generation prompt — as non-sampled
tokens (see :mod:`taurl.agents.chat`). All tokens of turn ``h`` and the bridge after
it carry ``turn_ids == h``; the first prompt carries ``-1``.

How an episode ends (``Trajectory.termination``):

- ``"terminated"`` / ``"truncated"``: the environment said so;
- ``"max_turns"``: :attr:`AgentConfig.max_turns` turns were taken;
- ``"context_overflow"``: the next prompt would not leave room for one new token
  within :attr:`AgentConfig.max_context_tokens` (each turn's ``max_tokens`` is also
  clipped to what fits, so the backend never sees a request it must refuse);
- ``"error"``: the environment raised (in ``reset`` or ``step``), or the backend
  aborted the request; the message is in ``info["error"]`` and, when an exception
  was raised, its last frames in ``info["traceback"]`` (:func:`traceback_summary`,
  bounded in length). Never an exception —
  except :class:`~taurl.errors.EnvWorkerLost`: the process holding the environment
  died, which is no fault of the episode, and the caller plays it again.

A turn cut by ``max_tokens`` (no EOS sampled) is closed by the bridge with the
template's EOS text as non-sampled tokens (mask 0), so the stream stays a valid
rendering. The observation that ends an episode is never appended to the stream (the
policy never sees it); it is kept in ``info["final_observation"]`` for readers (an env
that returns ``[]`` at the end may put its closing messages in its step info's
``"final_observation"``, as :class:`~taurl.envs.adapter.EnvAdapter` does). Each step's
``info`` is kept, one dict per turn, in ``info["step_infos"]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import gymnasium

from taurl.agents.backend import InferenceBackend
from taurl.agents.chat import BridgeMethod, ChatRenderer
from taurl.errors import ConfigError, EnvError, EnvWorkerLost
from taurl.types import JSONValue, Message, SamplingParams, Termination, Trajectory

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

R = TypeVar("R")


@dataclass
class AgentConfig:
    """How the agent runs one episode."""

    # most assistant turns per episode (the environment may end it sooner)
    max_turns: int = 8
    # context window in tokens (prompt + every turn), capped at the backend's max_model_len; None: the backend's
    max_context_tokens: int | None = None
    # per-turn sampling; max_tokens is the most new tokens in one turn, seed is replaced per request
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # after each episode compare its tokens with a full re-render of its messages (info["drift"])
    drift_check: bool = True

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ConfigError(f"AgentConfig.max_turns must be >= 1, got {self.max_turns}")
        if self.max_context_tokens is not None and self.max_context_tokens < 2:
            raise ConfigError(
                f"AgentConfig.max_context_tokens must be >= 2 (a prompt and one new token) or "
                f"None for the backend's limit, got {self.max_context_tokens}"
            )


def derive_seed(*parts: int | str) -> int:
    """A 31-bit seed derived from ``parts`` (stable across runs and platforms, unlike ``hash``)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


def _error_text(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _messages(obs: object, where: str) -> list[Message]:
    """An observation as a list of chat messages; :class:`EnvError` saying what came instead.

    Checked here because a wrong observation would otherwise fail deep in the chat
    template, outside the episode, and take the whole run down.
    """
    if isinstance(obs, (list, tuple)) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in obs
    ):
        return list(obs)
    raise EnvError(
        f"{where} returned the observation {obs!r:.120} ({type(obs).__name__}); expected a "
        "list of chat messages, e.g. [{'role': 'user', 'content': '...'}] (a single message "
        "goes in a list)"
    )


#: Frames and characters :func:`traceback_summary` keeps: enough to find the faulty
#: line of an environment, small enough for every errored episode's JSONL line.
TRACEBACK_FRAMES = 6
TRACEBACK_CHARS = 2000


def traceback_summary(exc: BaseException) -> str:
    """The last :data:`TRACEBACK_FRAMES` frames of ``exc``'s traceback and its message.

    At most :data:`TRACEBACK_CHARS` characters: the message keeps its start (its type
    and first words) within half of them, the frames keep their end (the innermost,
    where an environment's fault shows) within the rest.
    """
    half = TRACEBACK_CHARS // 2
    message = "".join(traceback.format_exception_only(exc)).rstrip("\n")
    if len(message) > half:
        message = message[: half - 3] + "..."
    frames = traceback.extract_tb(exc.__traceback__)[-TRACEBACK_FRAMES:]
    head = "Traceback (most recent call last):\n" if frames else ""
    stack = head + "".join(traceback.format_list(frames))
    room = TRACEBACK_CHARS - len(message)
    if len(stack) > room:
        stack = "..." + stack[-(room - 3):]
    return stack + message


@dataclass
class _Episode:
    """The growing token stream and bookkeeping of one episode."""

    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turn_ids: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    info: dict[str, JSONValue] = field(default_factory=dict)
    generate_s: float = 0.0
    env_s: float = 0.0

    def append(self, ids: list[int], turn: int, logprobs: list[float] | None = None) -> None:
        self.token_ids.extend(ids)
        self.turn_ids.extend([turn] * len(ids))
        if logprobs is None:
            self.loss_mask.extend([0] * len(ids))
            self.logprobs.extend([0.0] * len(ids))
        else:
            self.loss_mask.extend([1] * len(ids))
            self.logprobs.extend(logprobs)


class Agent:
    """Runs episodes of Gymnasium text environments against an inference backend.

    Args:
        backend: Where tokens are sampled; many episodes may share it concurrently.
        tokenizer: The policy's tokenizer (its chat template renders the conversation).
        config: Turn, context and sampling limits.
    """

    def __init__(
        self, backend: InferenceBackend, tokenizer: PreTrainedTokenizerBase, config: AgentConfig
    ) -> None:
        self.backend = backend
        self.renderer = ChatRenderer(tokenizer)
        self.config = config
        # A configured limit above the backend's would only move the overflow into the backend.
        limit = backend.max_model_len
        if config.max_context_tokens is not None:
            limit = min(limit, config.max_context_tokens)
        self.max_context_tokens: int = limit

    async def run_episode(
        self,
        env: gymnasium.Env,
        *,
        seed: int | None,
        sample_seed: int | None = None,
        env_id: str = "",
        group_id: str = "",
        options: dict[str, JSONValue] | None = None,
        executor: Executor | None = None,
    ) -> Trajectory:
        """Play one episode of ``env`` and return its Trajectory (never raises for env faults).

        Args:
            env: A taurl text environment (not yet reset).
            seed: The ``reset`` seed (which task; the same for every sample of a group).
            sample_seed: Base of the per-request sampling seeds (turn ``h`` uses
                ``derive_seed(sample_seed, h)``); None lets the backend choose.
            env_id: Recorded in the Trajectory.
            group_id: Recorded in the Trajectory; also the backend session id prefix.
            options: Passed to ``reset``.
            executor: Where ``reset``/``step`` run (off the event loop); None: asyncio's default.
        """
        t_start = time.perf_counter()
        ep = _Episode()
        policy_version = int(self.backend.policy_version)
        session_id = f"{group_id}/{sample_seed}"
        termination: Termination | None = None
        success: bool | None = None
        task_id = ""
        tools: list[dict[str, JSONValue]] | None = None
        final_observation: list[Message] = []
        last_turn: tuple[list[Message], str, bool] | None = None  # (before, content, ended_with_eos)
        methods: set[BridgeMethod] = set()
        finish_reasons: list[str] = []
        step_infos: list[dict[str, JSONValue]] = []
        tool_calls = tool_errors = 0

        try:
            obs, reset_info = await self._env_call(ep, executor, env.reset, seed=seed, options=options)
            obs = _messages(obs, "env.reset")
        except EnvWorkerLost:
            raise
        except Exception as exc:  # noqa: BLE001 - an env fault ends its episode, not the run
            termination = "error"
            ep.info["error"] = f"env.reset failed: {_error_text(exc)}"
            ep.info["traceback"] = traceback_summary(exc)
        else:
            task_id = str(reset_info.get("task_id", ""))
            if reset_info.get("privileged_context") is not None:
                ep.info["privileged_context"] = reset_info["privileged_context"]
            ep.messages, tools = self.renderer.prepare(obs, list(reset_info.get("tools") or []))
            ep.append(self.renderer.prompt_ids(ep.messages, tools), turn=-1)

        turn = 0
        while termination is None:
            room = self.max_context_tokens - len(ep.token_ids)
            if room < 1:
                termination = "context_overflow"
                break
            sampling = dataclasses.replace(
                self.config.sampling,
                max_tokens=min(self.config.sampling.max_tokens, room),
                seed=None if sample_seed is None else derive_seed(sample_seed, turn),
            )
            t0 = time.perf_counter()
            gen = await self.backend.generate(list(ep.token_ids), sampling, session_id=session_id)
            ep.generate_s += time.perf_counter() - t0
            finish_reasons.append(gen.finish_reason)
            if gen.finish_reason == "abort" or not gen.token_ids:
                # An aborted turn's tokens are not kept: no reward belongs to them.
                termination = "error"
                ep.info["error"] = (
                    f"the backend returned finish_reason={gen.finish_reason!r} with "
                    f"{len(gen.token_ids)} tokens on turn {turn}"
                )
                break
            ep.append(gen.token_ids, turn, gen.logprobs)
            ended_with_eos = gen.token_ids[-1] == self.renderer.eos_token_id
            content = self.renderer.assistant_content(gen.token_ids)
            before = ep.messages
            ep.messages = [*before, {"role": "assistant", "content": content}]
            last_turn = (before, content, ended_with_eos)

            try:
                obs, reward, terminated, truncated, step_info = await self._env_call(
                    ep, executor, env.step, content
                )
                obs = _messages(obs, "env.step")
            except EnvWorkerLost:
                raise
            except Exception as exc:  # noqa: BLE001 - an env fault ends its episode, not the run
                ep.rewards.append(0.0)
                termination = "error"
                ep.info["error"] = f"env.step failed on turn {turn}: {_error_text(exc)}"
                ep.info["traceback"] = traceback_summary(exc)
                break
            ep.rewards.append(float(reward))
            step_infos.append(dict(step_info))
            tool_calls += int(step_info.get("tool_calls", 0) or 0)
            tool_errors += int(step_info.get("tool_errors", 0) or 0)
            if step_info.get("success") is not None:
                success = bool(step_info["success"])
            if terminated or truncated or turn + 1 >= self.config.max_turns:
                termination = "terminated" if terminated else "truncated" if truncated else "max_turns"
                final_observation = obs or list(step_info.get("final_observation") or [])
                break
            bridge = self.renderer.bridge(before, content, ended_with_eos, obs, tools=tools)
            methods.add(bridge.method)
            if len(ep.token_ids) + len(bridge.token_ids) >= self.max_context_tokens:
                termination = "context_overflow"
                final_observation = obs
                break
            ep.append(bridge.token_ids, turn)
            ep.messages = [*ep.messages, *obs]
            last_turn = None
            turn += 1

        ep.info.update(
            tool_calls=tool_calls,
            tool_errors=tool_errors,
            finish_reasons=list(finish_reasons),
            final_observation=final_observation,
            step_infos=step_infos,
            bridge_method="dummy" if "dummy" in methods else "diff",
        )
        if self.config.drift_check and termination != "error" and ep.token_ids:
            closing: list[int] = []
            if last_turn is not None:
                before, content, ended_with_eos = last_turn
                closing = self.renderer.bridge(
                    before, content, ended_with_eos, [], add_generation_prompt=False, tools=tools
                ).token_ids
            report = self.renderer.check_drift(ep.token_ids, ep.messages, closing, tools=tools)
            ep.info["drift"] = report.to_dict()

        return Trajectory(
            token_ids=ep.token_ids,
            loss_mask=ep.loss_mask,
            logprobs=ep.logprobs,
            turn_ids=ep.turn_ids,
            rewards=ep.rewards,
            episode_return=float(sum(ep.rewards)),
            termination=termination,
            env_id=env_id,
            task_id=task_id,
            seed=seed,
            group_id=group_id,
            policy_version=policy_version,
            success=success,
            messages=ep.messages,
            timing={
                "generate_s": ep.generate_s,
                "env_s": ep.env_s,
                "total_s": time.perf_counter() - t_start,
            },
            info=ep.info,
        )

    @staticmethod
    async def _env_call(
        ep: _Episode, executor: Executor | None, fn: Callable[..., R], *args: object, **kwargs: object
    ) -> R:
        """Run a blocking env call off the event loop, adding its time to ``ep.env_s``."""
        t0 = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                executor, functools.partial(fn, *args, **kwargs)
            )
        finally:
            ep.env_s += time.perf_counter() - t0
