"""Wrap a Gymnasium environment whose observations and actions are strings.

Third-party text games (TextWorld-style, or anything with ``str`` observations and
``str`` actions) plug into taurl through :class:`TextEnvAdapter`: each string
observation becomes one chat message, actions pass through unchanged, and the info
dict gets taurl's keys (``task_id``, ``tools``, ``success``...)::

    env = TextEnvAdapter(gymnasium.make("SomeTextGame-v0"), system_prompt="You play a game.")
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, SupportsFloat

import gymnasium

from taurl.envs.base import SPLITS, Info
from taurl.envs.spaces import MessagesSpace, TextSpace
from taurl.errors import ConfigError, EnvError
from taurl.types import JSONValue, Message


class TextEnvAdapter(gymnasium.Env[list, str]):
    """Present a ``str -> str`` Gymnasium env under taurl's message contract.

    Args:
        env: The wrapped environment; ``reset`` and ``step`` must return ``str`` observations.
        system_prompt: Optional system message before the first observation.
        role: Role of the observation messages (``"user"`` renders under every chat template).
        format_observation: Turns an observation string into message content (default: as is).
        success_key: Key of the wrapped env's info holding a success flag, if it has one;
            otherwise a terminal step counts as success when its reward is > 0.
        split: Reported in ``info["split"]``; the wrapped env decides what its tasks are.
        env_name: Used in ``task_id`` (``"<env_name>/seed=<seed>"``); defaults to the spec id or class name.
    """

    metadata: ClassVar[dict[str, JSONValue]] = {"render_modes": []}

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
            raise ConfigError(f"TextEnvAdapter wraps a gymnasium.Env, got {type(env).__name__}")
        if role not in ("user", "system", "tool"):
            raise ConfigError(f"TextEnvAdapter: role must be 'user', 'system' or 'tool', got {role!r}")
        if split not in SPLITS:
            raise ConfigError(f"TextEnvAdapter: split must be one of {SPLITS}, got {split!r}")
        self.env = env
        self.system_prompt = system_prompt
        self.role = role
        self.format_observation = format_observation or (lambda s: s)
        self.success_key = success_key
        self.split = split
        spec_id = env.spec.id if env.spec is not None else None
        self.env_name = env_name or spec_id or type(env.unwrapped).__name__
        self.observation_space = MessagesSpace()
        self.action_space = TextSpace()
        self._seed: int | None = None
        self._episode = 0
        self._started = False
        self.done = True

    def _message(self, obs: object, where: str) -> Message:
        if not isinstance(obs, str):
            raise EnvError(
                f"TextEnvAdapter: the wrapped env's {where} returned a {type(obs).__name__} "
                "observation, expected str; only text environments can be adapted"
            )
        return {"role": self.role, "content": self.format_observation(obs)}

    def reset(
        self, *, seed: int | None = None, options: dict[str, JSONValue] | None = None
    ) -> tuple[list[Message], Info]:
        super().reset(seed=seed)  # marks the adapter as reset, for check_env's order checks
        obs, inner_info = self.env.reset(seed=seed, options=options)
        if seed is not None:
            self._seed, self._episode = seed, 0
        else:
            self._episode += 1
        self._started = True
        self.done = False
        messages: list[Message] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append(self._message(obs, "reset()"))
        info: Info = dict(inner_info)
        info.update(
            task_id=f"{self.env_name}/seed={self._seed}/episode={self._episode}",
            tools=[],
            split=self.split,
            privileged_context=None,
        )
        return messages, info

    def step(self, action: str) -> tuple[list[Message], float, bool, bool, Info]:
        if not self._started:
            raise EnvError("TextEnvAdapter.step() called before reset(); call env.reset(seed=...) first")
        if self.done:
            raise EnvError("TextEnvAdapter.step() called after the episode ended; call env.reset()")
        if not isinstance(action, str):
            raise EnvError(f"TextEnvAdapter.step() expects a str action, got {type(action).__name__}")
        obs, reward, terminated, truncated, inner_info = self.env.step(action)
        reward_f = float(reward) if isinstance(reward, SupportsFloat) else math.nan
        if not math.isfinite(reward_f):
            raise EnvError(f"TextEnvAdapter: the wrapped env returned reward {reward!r}, expected a finite number")
        terminated, truncated = bool(terminated), bool(truncated)
        self.done = terminated or truncated
        info: Info = dict(inner_info)
        info.setdefault("tool_calls", 0)
        info.setdefault("tool_errors", 0)
        if self.success_key is not None and self.success_key in inner_info:
            info["success"] = bool(inner_info[self.success_key])
        elif terminated:
            info["success"] = reward_f > 0
        elif truncated:
            info["success"] = False
        messages = [] if self.done else [self._message(obs, "step()")]
        return messages, reward_f, terminated, truncated, info

    def close(self) -> None:
        self.env.close()
