"""Run environments written for other tools under taurl's message contract.

:class:`EnvAdapter` takes any object with ``reset`` and ``step`` (a ``gymnasium.Env``
or not) and presents it as a taurl text environment:

- ``reset`` gets ``seed`` and ``options`` only if its signature accepts them, and may
  return ``obs`` or ``(obs, info)``;
- ``step`` may return Gymnasium's five values, the older four
  ``(obs, reward, done, info)``, or a mapping with ``observations``/``reward``/``done``
  (SkyRL); a single ``done`` becomes ``terminated`` unless ``truncated_if`` says it was
  a cutoff;
- an observation may be a string, a chat message, a list of messages or a list of
  strings (``format_observation`` turns anything else into one of these);
- ``success(result)`` decides success (default: a final reward at or above
  ``success_threshold``, so partial credit is not success);
- ``task_id(messages, info)`` names the task (default: a hash of the first
  observation, so two seeds that pose the same puzzle are one task);
- every step's ``info`` carries the wrapped env's own info (made JSON-safe) under
  ``"env_info"``, and the observation that ends the episode under ``"final_observation"``.

Environments that seed Python's or NumPy's *global* random state in ``reset`` (GEM,
TextArena) are not thread-safe: with several env threads, one thread's ``random.seed``
lands between another's seed and draw, and a seed stops naming its task. Such envs run
their calls under one process-wide lock (:func:`global_random_lock`). ``global_random=None``
detects them: the first reset runs under the lock and compares the global states before
and after. For many such envs at once, processes scale better than a lock
(``rollout.env_workers`` with Ray envs).

:class:`TextEnvAdapter` is the older, stricter wrapper kept for existing code: a
``gymnasium.Env`` with ``str`` observations, success when the final reward is > 0 and
seed-based task ids. Ready-made adapters for SkyRL-Gym, GEM, TextArena and reasoning-gym
are in :mod:`taurl.envs.thirdparty`.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import inspect
import json
import math
import random
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol, SupportsFloat

import gymnasium
import numpy as np

from taurl.envs.base import SPLITS, Info
from taurl.envs.spaces import ROLES, MessagesSpace, TextSpace
from taurl.errors import ConfigError, EnvError
from taurl.types import JSONValue, Message

# Python's and NumPy's global random states are process-wide, so the lock guarding
# them must be too: one per process, shared by every adapter instance.
_GLOBAL_RANDOM_LOCK = threading.RLock()


@contextlib.contextmanager
def global_random_lock() -> Iterator[None]:
    """Hold the process-wide lock of envs that use Python's or NumPy's global random state.

    Take it around anything such an env does that seeds or draws from the global state
    outside :class:`EnvAdapter` (e.g. a constructor that calls ``reset``).
    """
    with _GLOBAL_RANDOM_LOCK:
        yield


def _global_random_state() -> tuple[object, bytes, int]:
    _, keys, pos, *_ = np.random.get_state()
    return random.getstate(), bytes(np.asarray(keys).tobytes()), int(pos)


class ResettableEnv(Protocol):
    """Anything with ``reset`` and ``step``: what :class:`EnvAdapter` wraps."""

    def reset(self, *args: object, **kwargs: object) -> object: ...

    def step(self, action: str) -> object: ...


@dataclass(frozen=True)
class StepResult:
    """One step of the wrapped env, read into Gymnasium's terms (what the hooks see)."""

    messages: list[Message]  # the observation as chat messages
    reward: float  # this step's reward
    terminated: bool  # the task reached an end state
    truncated: bool  # cut off (the env's own limit, or the adapter's max_turns)
    info: dict[str, JSONValue]  # the wrapped env's info, JSON-safe
    turn: int  # 1 for the first step of the episode


def json_safe(value: object, depth: int = 0) -> JSONValue:
    """``value`` as JSON: containers recurse, NumPy scalars unwrap, non-finite floats become None, the rest ``str``."""
    if depth > 20:
        return str(value)
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return json_safe(value.item(), depth + 1)
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist(), depth + 1)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [json_safe(v, depth + 1) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    return str(value)


def observation_hash_task_id(name: str) -> Callable[[list[Message], Info], str]:
    """The default task id: ``"<name>/<12 hex digits of sha256 of the first observation>"``."""

    def task_id(messages: list[Message], info: Info) -> str:
        digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]
        return f"{name}/{digest}"

    return task_id


def _accepts(fn: Callable[..., object], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class EnvAdapter(gymnasium.Env[list, str]):
    """Present any ``reset``/``step`` environment under taurl's message contract.

    Args:
        env: The wrapped environment: any object with ``reset`` and ``step``.
        name: Used in task ids and messages; default the spec id or class name.
        system_prompt: Optional system message before the first observation.
        role: Role of string observations (``"user"`` renders under every chat template).
        format_observation: Turns a raw observation into a string, a message or a list of
            messages (default: taken as is).
        success: ``(result) -> bool`` on the step that ends the episode; default: reward
            at or above ``success_threshold`` on a terminated step.
        success_threshold: Used by the default ``success``.
        task_id: ``(first_messages, reset_info) -> str``; default: a hash of the first observation.
        truncated_if: For envs that report one ``done`` flag: ``(result) -> bool``, True
            when that ``done`` was a cutoff rather than an end state. Default: never.
        max_turns: Truncate after this many steps (None: the env's own limit only).
        global_random: The env uses Python's or NumPy's global random state: True runs
            its calls under :func:`global_random_lock`, False never, None detects it.
        split: Reported in ``info["split"]``; the wrapped env decides what its tasks are.
    """

    metadata: ClassVar[dict[str, JSONValue]] = {"render_modes": []}
    _owner = "EnvAdapter"

    def __init__(
        self,
        env: ResettableEnv,
        *,
        name: str | None = None,
        system_prompt: str | None = None,
        role: str = "user",
        format_observation: Callable[[object], object] | None = None,
        success: Callable[[StepResult], bool] | None = None,
        success_threshold: float = 1.0,
        task_id: Callable[[list[Message], Info], str] | None = None,
        truncated_if: Callable[[StepResult], bool] | None = None,
        max_turns: int | None = None,
        global_random: bool | None = None,
        split: str = "train",
    ) -> None:
        owner = self._owner
        for method in ("reset", "step"):
            if not callable(getattr(env, method, None)):
                raise ConfigError(
                    f"{owner} wraps an object with reset() and step() methods, got "
                    f"{type(env).__name__} without {method}()"
                )
        if role not in ("user", "system", "tool"):
            raise ConfigError(f"{owner}: role must be 'user', 'system' or 'tool', got {role!r}")
        if split not in SPLITS:
            raise ConfigError(f"{owner}: split must be one of {SPLITS}, got {split!r}")
        if max_turns is not None and (not isinstance(max_turns, int) or max_turns < 1):
            raise ConfigError(f"{owner}: max_turns must be an int >= 1 or None (no limit), got {max_turns!r}")
        if global_random not in (True, False, None):
            raise ConfigError(f"{owner}: global_random must be True, False or None (detect), got {global_random!r}")
        self.env = env
        spec = getattr(env, "spec", None)
        unwrapped = getattr(env, "unwrapped", env)
        self.env_name = name or getattr(spec, "id", None) or type(unwrapped).__name__
        self.system_prompt = system_prompt
        self.role = role
        self.format_observation = format_observation
        self.success = success
        self.success_threshold = float(success_threshold)
        self.task_id = task_id or observation_hash_task_id(self.env_name)
        self.truncated_if = truncated_if
        self.max_turns = max_turns
        self.global_random = global_random
        self.split = split
        self.observation_space = MessagesSpace()
        self.action_space = TextSpace()
        self._reset_seed = _accepts(env.reset, "seed")
        self._reset_options = _accepts(env.reset, "options")
        self._turn = 0
        self._started = False
        self.done = True

    # -- reading the wrapped env -------------------------------------------------------

    def _messages(self, obs: object, where: str) -> list[Message]:
        if self.format_observation is not None:
            obs = self.format_observation(obs)
        if isinstance(obs, str):
            return [{"role": self.role, "content": obs}]
        if isinstance(obs, Mapping):
            obs = [obs]
        if isinstance(obs, (list, tuple)):
            messages: list[Message] = []
            for item in obs:
                if isinstance(item, str):
                    messages.append({"role": self.role, "content": item})
                elif (
                    isinstance(item, Mapping) and item.get("role") in ROLES and isinstance(item.get("content"), str)
                ):
                    messages.append({"role": item["role"], "content": item["content"]})
                else:
                    raise EnvError(
                        f"{self._owner}: the wrapped env's {where} returned a list holding {item!r:.100}; "
                        "expected strings or {'role', 'content'} messages. Pass format_observation= "
                        "to turn its observations into text"
                    )
            return messages
        raise EnvError(
            f"{self._owner}: the wrapped env's {where} returned a {type(obs).__name__} observation, "
            "expected str, a message or a list of messages; pass format_observation= to turn it into text"
        )

    def _read_step(self, result: object) -> tuple[object, float, bool, bool | None, object]:
        """``(obs, reward, terminated, truncated, info)``; ``truncated`` is None after a single ``done``."""
        if isinstance(result, Mapping) and "done" in result:
            obs, reward, done, info = result.get("observations"), result.get("reward"), result["done"], result.get("metadata")
            terminated, truncated = bool(done), None
        elif isinstance(result, tuple) and len(result) == 5:
            obs, reward, terminated, truncated, info = result
            terminated, truncated = bool(terminated), bool(truncated)
        elif isinstance(result, tuple) and len(result) == 4:
            obs, reward, done, info = result
            terminated, truncated = bool(done), None
        else:
            raise EnvError(
                f"{self._owner}: the wrapped env's step() returned {result!r:.200}; expected "
                "(obs, reward, terminated, truncated, info), (obs, reward, done, info) or a "
                "mapping with 'observations', 'reward' and 'done'"
            )
        reward_f = float(reward) if isinstance(reward, SupportsFloat) else math.nan
        if not math.isfinite(reward_f):
            raise EnvError(f"{self._owner}: the wrapped env returned reward {reward!r}, expected a finite number")
        return obs, reward_f, terminated, truncated, info

    @contextlib.contextmanager
    def _guard(self, detect: bool) -> Iterator[None]:
        """Hold the global-random lock when the env needs it (or while detecting whether it does)."""
        if self.global_random is False or (self.global_random is None and not detect):
            yield
            return
        with _GLOBAL_RANDOM_LOCK:
            before = _global_random_state() if self.global_random is None else None
            yield
            if before is not None and _global_random_state() != before:
                self.global_random = True

    # -- gymnasium API -----------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, JSONValue] | None = None
    ) -> tuple[list[Message], Info]:
        super().reset(seed=seed)  # marks the adapter as reset, for check_env's order checks
        kwargs: dict[str, object] = {}
        if seed is not None:
            if not self._reset_seed:
                raise EnvError(
                    f"{self._owner}: {self.env_name}'s reset() takes no seed, so a seed cannot name a "
                    "task; wrap it in an object whose reset(seed=...) seeds the task"
                )
            kwargs["seed"] = seed
        if options is not None and self._reset_options:
            kwargs["options"] = options
        with self._guard(detect=True):
            result = self.env.reset(**kwargs)
        obs, inner_info = result if isinstance(result, tuple) and len(result) == 2 else (result, {})
        self._turn = 0
        self._started = True
        self.done = False
        messages: list[Message] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.extend(self._messages(obs, "reset()"))
        info = self._reset_info(messages, inner_info)
        return messages, info

    def _reset_info(self, messages: list[Message], inner_info: object) -> Info:
        info: Info = {"env_info": json_safe(inner_info)}
        info.update(tools=[], split=self.split, privileged_context=None)
        info["task_id"] = str(self.task_id(messages, info))
        return info

    def step(self, action: str) -> tuple[list[Message], float, bool, bool, Info]:
        if not self._started:
            raise EnvError(f"{self._owner}.step() called before reset(); call env.reset(seed=...) first")
        if self.done:
            raise EnvError(f"{self._owner}.step() called after the episode ended; call env.reset()")
        if not isinstance(action, str):
            raise EnvError(f"{self._owner}.step() expects a str action, got {type(action).__name__}")
        with self._guard(detect=False):
            raw = self.env.step(action)
        obs, reward, terminated, truncated, inner_info = self._read_step(raw)
        self._turn += 1
        safe_info = json_safe(inner_info or {})
        messages = self._messages(obs, "step()") if obs is not None and obs != "" and obs != [] else []
        result = StepResult(
            messages, reward, terminated, bool(truncated),
            safe_info if isinstance(safe_info, dict) else {"info": safe_info}, self._turn,
        )
        if truncated is None and terminated and self.truncated_if is not None and self.truncated_if(result):
            terminated, truncated = False, True
        truncation = None
        if not (terminated or truncated) and self.max_turns is not None and self._turn >= self.max_turns:
            truncated, truncation = True, "max_turns"
        result = StepResult(messages, reward, terminated, bool(truncated), result.info, self._turn)
        self.done = terminated or bool(truncated)
        info: Info = {"env_info": result.info, "tool_calls": 0, "tool_errors": 0}
        if truncation:
            info["truncation"] = truncation
        if self.done:
            info["success"] = bool(self._success(result))
            info["final_observation"] = messages  # the loop keeps it; the policy never sees it
            messages = []
        return messages, reward, terminated, bool(truncated), info

    def _success(self, result: StepResult) -> bool:
        if self.success is not None:
            return self.success(result)
        return result.terminated and result.reward >= self.success_threshold

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if callable(close):
            close()


class TextEnvAdapter(EnvAdapter):
    """Present a ``str -> str`` Gymnasium env under taurl's message contract (the older adapter).

    Kept for existing code; :class:`EnvAdapter` takes more kinds of envs and has better
    defaults. The wrapped env's info keys are merged into taurl's info, a terminal step
    with reward > 0 counts as success, and ``task_id`` is ``"<env_name>/seed=<seed>/episode=<n>"``.

    Args:
        env: The wrapped environment; ``reset`` and ``step`` must return ``str`` observations.
        system_prompt: Optional system message before the first observation.
        role: Role of the observation messages (``"user"`` renders under every chat template).
        format_observation: Turns an observation string into message content (default: as is).
        success_key: Key of the wrapped env's info holding a success flag, if it has one;
            otherwise a terminal step counts as success when its reward is > 0.
        split: Reported in ``info["split"]``; the wrapped env decides what its tasks are.
        env_name: Used in ``task_id``; defaults to the spec id or class name.
    """

    _owner = "TextEnvAdapter"

    def __init__(
        self,
        env: gymnasium.Env,
        *,
        system_prompt: str | None = None,
        role: str = "user",
        format_observation: Callable[[str], str] | None = None,
        success_key: str | None = None,
        split: str = "train",
        env_name: str | None = None,
    ) -> None:
        if not isinstance(env, gymnasium.Env):
            raise ConfigError(
                f"TextEnvAdapter wraps a gymnasium.Env, got {type(env).__name__}; use "
                "taurl.envs.EnvAdapter for any object with reset() and step()"
            )
        self._format_text = format_observation or (lambda s: s)
        self.success_key = success_key
        self._seed: int | None = None
        self._episode = 0
        super().__init__(
            env, name=env_name, system_prompt=system_prompt, role=role,
            format_observation=self._text_only, success=self._legacy_success, split=split,
            global_random=False,
        )

    def _text_only(self, obs: object) -> str:
        if not isinstance(obs, str):
            raise EnvError(
                f"TextEnvAdapter: the wrapped env returned a {type(obs).__name__} observation, "
                "expected str; use taurl.envs.EnvAdapter for message or other observations"
            )
        return self._format_text(obs)

    def _legacy_success(self, result: StepResult) -> bool:
        if self.success_key is not None and self.success_key in result.info:
            return bool(result.info[self.success_key])
        return result.terminated and result.reward > 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, JSONValue] | None = None
    ) -> tuple[list[Message], Info]:
        if seed is not None:
            self._seed, self._episode = seed, 0
        else:
            self._episode += 1
        return super().reset(seed=seed, options=options)

    def _reset_info(self, messages: list[Message], inner_info: object) -> Info:
        info: Info = dict(json_safe(inner_info) or {})  # type: ignore[arg-type]
        info.update(
            task_id=f"{self.env_name}/seed={self._seed}/episode={self._episode}",
            tools=[], split=self.split, privileged_context=None,
        )
        return info

    def step(self, action: str) -> tuple[list[Message], float, bool, bool, Info]:
        messages, reward, terminated, truncated, info = super().step(action)
        merged: Info = dict(info["env_info"])  # type: ignore[arg-type]
        merged.update(info)
        return messages, reward, terminated, truncated, merged
