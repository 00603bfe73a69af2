"""TextEnvAdapter: a third-party string-in/string-out Gymnasium game under the message contract."""

from __future__ import annotations

import gymnasium
import pytest

from taurl.envs import TextEnvAdapter, check_env, run_episode
from taurl.errors import ConfigError, EnvError


class ReverseGame(gymnasium.Env):
    """A stand-in third-party text game: type the shown word backwards; three tries."""

    WORDS = ("apple", "river", "stone", "cloud", "maple", "tiger")

    def __init__(self, numeric_obs: bool = False) -> None:
        self.observation_space = gymnasium.spaces.Text(64)
        self.action_space = gymnasium.spaces.Text(64)
        self.numeric_obs = numeric_obs

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[object, dict]:
        super().reset(seed=seed)
        self.word = self.WORDS[int(self.np_random.integers(len(self.WORDS)))]
        self.tries = 0
        return (7 if self.numeric_obs else f"Type '{self.word}' backwards."), {"word": self.word}

    def step(self, action: str) -> tuple[str, int, bool, bool, dict]:
        self.tries += 1
        won = action.strip() == self.word[::-1]
        return ("You win!" if won else "No, try again."), int(won), won, self.tries >= 3 and not won, {}


def solve(env: gymnasium.Env, messages: list[dict]) -> str:
    return messages[-1]["content"].split("'")[1][::-1]


def test_adapter_passes_check_env_and_plays() -> None:
    env = TextEnvAdapter(ReverseGame(), system_prompt="You play word games.", env_name="reverse")
    check_env(env)
    obs, info = env.reset(seed=3)
    assert obs[0] == {"role": "system", "content": "You play word games."}
    assert obs[1]["role"] == "user" and obs[1]["content"].startswith("Type '")
    assert info["task_id"] == "reverse/seed=3/episode=0" and info["tools"] == [] and "word" in info
    result = run_episode(env, solve, seed=1)
    assert result.success is True and result.rewards == [1.0] and result.terminated
    lost = run_episode(env, lambda e, m: "wrong", seed=1)
    assert lost.truncated and lost.success is False and lost.rewards == [0.0, 0.0, 0.0]
    assert lost.messages[-2] == {"role": "user", "content": "No, try again."}
    assert isinstance(lost.rewards[0], float)


def test_adapter_formats_and_rejects_non_text() -> None:
    env = TextEnvAdapter(ReverseGame(), format_observation=lambda s: f"[game] {s}")
    obs, _ = env.reset(seed=0)
    assert obs == [{"role": "user", "content": f"[game] Type '{env.env.word}' backwards."}]
    with pytest.raises(EnvError, match="returned a int observation, expected str"):
        TextEnvAdapter(ReverseGame(numeric_obs=True)).reset(seed=0)
    with pytest.raises(ConfigError, match="wraps a gymnasium.Env"):
        TextEnvAdapter("not an env")  # type: ignore[arg-type]
