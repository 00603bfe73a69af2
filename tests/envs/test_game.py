"""GuessNumber-v0: per-turn rewards, splits with different ranges, scripted solve and fail."""

from __future__ import annotations

import math

import gymnasium
import pytest

import taurl.envs  # noqa: F401  (registers the ids)
from taurl.envs import check_env, run_episode
from taurl.envs.game import GuessNumberEnv, failing_policy, oracle_policy, read_guess
from taurl.errors import ConfigError


@pytest.mark.parametrize(("split", "high", "turns"), [("train", 100, 10), ("heldout", 1000, 12)])
def test_scripted_agents_solve_and_fail(split: str, high: int, turns: int) -> None:
    env = gymnasium.make("taurl/GuessNumber-v0", split=split)
    check_env(env)
    secrets = set()
    for seed in range(60):
        solved = run_episode(env, oracle_policy, seed=seed)
        secrets.add(env.unwrapped.secret)
        assert solved.success is True and solved.terminated and solved.rewards[-1] == 1.0
        assert solved.steps <= math.ceil(math.log2(high + 1))
        assert all(0 < r <= 0.5 for r in solved.rewards[:-1])  # binary search narrows every turn
        assert 1.0 < solved.episode_return <= 1.5 or solved.steps == 1
        failed = run_episode(env, failing_policy, seed=seed)
        assert failed.truncated and failed.success is False and failed.steps == turns
        assert failed.rewards == [0.0] * turns
    assert max(secrets) > 100 if split == "heldout" else max(secrets) <= 100


def test_turn_rewards_by_hand() -> None:
    env = GuessNumberEnv(low=1, high=100, shaping=0.5, format_penalty=0.2)
    env.reset(seed=0)
    env.secret = 30
    obs, r, term, trunc, info = env.step("<answer>50</answer>")
    assert obs[0]["content"] == "50 is wrong: my number is lower. 9 guesses left."
    assert r == pytest.approx(0.5 * 51 / 100) and not term and info["guess"] == 50  # [1, 100] -> [1, 49]
    _, r, *_ = env.step("I guess 60")  # inconsistent guess: nothing narrowed
    assert r == 0.0
    obs, r, term, _, info = env.step("no idea")
    assert r == -0.2 and not term and "could not find a number" in obs[0]["content"]
    _, r, *_ = env.step("<answer>20</answer>")  # [1, 49] -> [21, 49]
    assert r == pytest.approx(0.5 * 20 / 100)
    obs, r, term, trunc, info = env.step("Is it 30?")
    assert (obs, r, term, trunc, info["success"]) == ([], 1.0, True, False, True)


def test_read_guess() -> None:
    assert read_guess("<answer>42</answer> not 7") == 42
    assert read_guess("maybe 3 or 9") == 9
    assert read_guess("-5") == -5
    assert read_guess("none") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"low": 5, "high": 6}, "need high - low >= 2"), ({"shaping": -1.0}, "shaping must be a finite number"),
     ({"split": "dev"}, "split must be one of"), ({"low": "1"}, "low must be an int")],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GuessNumberEnv(**kwargs)
