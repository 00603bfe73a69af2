"""Third-party envs (SkyRL-Gym, GEM, TextArena, reasoning-gym) through EnvAdapter, on real package envs."""

from __future__ import annotations

import random

import gymnasium
import pytest

import taurl.envs  # noqa: F401  registers the ids
from taurl.envs import EnvAdapter, StepResult, check_env, run_episode
from taurl.envs.checker import _check_concurrent_resets, run_concurrently
from taurl.errors import ConfigError, EnvError

pytest.importorskip("gem")
pytest.importorskip("textarena")
pytest.importorskip("skyrl_gym")
pytest.importorskip("reasoning_gym")

from taurl.envs.thirdparty import (
    first_available_move,
    gem_env,
    reasoning_gym_env,
    register_thirdparty,
    skyrl_env,
    textarena_env,
)


def test_gem_guess_the_number() -> None:
    env = gymnasium.make("gem/game.GuessTheNumber-v0-easy", disable_env_checker=True)
    check_env(env)
    secret = {}

    def bisect(e: gymnasium.Env, messages: list[dict]) -> str:
        secret.setdefault("n", e.unwrapped.env.game_number)
        return f"\\boxed{{{secret['n']}}}"

    won = run_episode(env, bisect, seed=3)
    assert won.success is True and won.terminated and won.rewards == [1.0]
    # The game's partial credit at the turn limit (reward up to 0.9) is not success.
    lost = run_episode(env, lambda e, m: "\\boxed{1}" if e.unwrapped.env.game_number != 1 else "\\boxed{2}", seed=3)
    assert lost.success is False
    assert lost.infos[-1]["final_observation"], "the closing observation is kept in the step info"
    assert "env_info" in lost.infos[0] and lost.infos[0]["env_info"]["suffix"] == "Enter your next guess."


def test_textarena_single_player_and_message_lists() -> None:
    env = gymnasium.make("textarena/FifteenPuzzle-v0", disable_env_checker=True)
    check_env(env)
    obs, info = env.reset(seed=1)
    assert obs[0]["content"].startswith("[GAME] You are Player 0") and info["task_id"].startswith("textarena/")
    result = run_episode(env, lambda e, m: "[up]", seed=1, max_steps=400)
    assert result.terminated or result.truncated
    assert result.success is False and result.error is None


def test_textarena_two_player_with_opponent() -> None:
    env = textarena_env("TicTacToe-v0", opponent=first_available_move)
    check_env(env, distinct_tasks="no")

    def my_moves(e: gymnasium.Env, messages: list[dict]) -> str:
        return first_available_move("\n".join(m["content"] for m in messages if m["role"] == "user"))

    result = run_episode(env, my_moves, seed=0)
    assert result.error is None and result.terminated and result.rewards[-1] in (-1.0, 0.0, 1.0)
    assert result.success is (result.rewards[-1] >= 1.0)
    assert result.infos[-1]["env_info"]["game_info"]["role"] == "Player 0"
    with pytest.raises(ConfigError, match="pass opponent="):
        textarena_env("TicTacToe-v0", num_players=2)


def test_reasoning_gym_success_is_full_credit() -> None:
    env = reasoning_gym_env("leg_counting", size=50)
    check_env(env)
    env.reset(seed=4)
    answer = env.env.entry["answer"]
    _, reward, terminated, _, info = env.step(f"<answer>{answer}</answer>")
    assert reward == 1.0 and terminated and info["success"] is True
    env.reset(seed=4)
    _, reward, _, _, info = env.step(f"<answer>{answer} legs, or 1</answer>")
    assert 0 < reward < 1 and info["success"] is False, "partial credit is not success"
    held = reasoning_gym_env("leg_counting", size=50, split="heldout")
    assert held.reset(seed=4)[0] != env.reset(seed=4)[0]


def test_skyrl_gsm8k_dict_steps_and_done_mapping() -> None:
    env = skyrl_env("gsm8k")
    check_env(env)
    env.reset(seed=0)
    truth = env.env.env.ground_truth
    _, reward, terminated, truncated, info = env.step(f"so #### {truth}")
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)
    multi = skyrl_env("gsm8k_multi_turn")
    result = run_episode(multi, lambda e, m: "#### -1", seed=0)
    assert result.truncated and not result.terminated and result.steps == 5, "SkyRL's done at its turn limit"
    assert result.success is False


def test_task_ids_name_tasks_not_seeds() -> None:
    # GEM's easy Tower of Hanoi poses one puzzle whatever the seed: one task id, and
    # check_env says so instead of counting eight tasks.
    env = gem_env("game:TowerofHanoi-v0-easy")
    ids = {env.reset(seed=s)[1]["task_id"] for s in range(8)}
    assert len(ids) == 1
    with pytest.raises(EnvError, match="same first observation.*distinct_tasks='task_id'"):
        check_env(env)
    custom = gem_env("game:GuessTheNumber-v0-easy", task_id=lambda msgs, info: "fixed")
    assert custom.reset(seed=0)[1]["task_id"] == "fixed"


class _Hidden:
    """A duck-typed env (no gymnasium) with a secret the observation does not show; old four-value step."""

    def reset(self, seed: int | None = None) -> tuple[str, dict]:
        self.secret = random.Random(seed).randint(1, 100)
        return "Guess my number.", {"puzzle": self.secret}

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        return "", float(action.strip() == str(self.secret)) * 0.5, True, {"secret": self.secret}


def test_duck_typed_env_hooks() -> None:
    env = EnvAdapter(
        _Hidden(), name="hidden",
        task_id=lambda msgs, info: f"hidden/{info['env_info']['puzzle']}",
        success=lambda r: r.reward == 0.5,
        truncated_if=lambda r: r.reward == 0.0,
    )
    check_env(env, distinct_tasks="task_id")
    with pytest.raises(EnvError, match="same first observation"):
        check_env(EnvAdapter(_Hidden()))
    env.reset(seed=1)
    _, reward, terminated, truncated, info = env.step(str(env.env.secret))
    assert (reward, terminated, truncated, info["success"]) == (0.5, True, False, True)
    env.reset(seed=1)
    _, _, terminated, truncated, info = env.step("0")
    assert (terminated, truncated, info["success"]) == (False, True, False)
    with pytest.raises(ConfigError, match="reset\\(\\) and step\\(\\)"):
        EnvAdapter(object())  # type: ignore[arg-type]


def _serial_and_concurrent(make: callable, seeds: range, threads: int = 8, rounds: int = 5) -> int:
    """How many of the concurrent same-seed resets drew another secret than a serial reset."""
    def draw(env: EnvAdapter, seed: int) -> tuple:
        obs, _ = env.reset(seed=seed)
        return obs[0]["content"], env.env.game_number

    serial = {s: draw(make(), s) for s in seeds}
    bad = []

    def worker(env: EnvAdapter) -> None:
        for _ in range(rounds):
            for s in seeds:
                if draw(env, s) != serial[s]:
                    bad.append(s)

    assert run_concurrently(worker, [make() for _ in range(threads)]) == []
    return len(bad)


@pytest.mark.parametrize("global_random", [True, None])
def test_seeding_race_is_closed(global_random: bool | None) -> None:
    # GEM seeds the global `random` in reset(); the lock (given or detected) makes 8 threads agree.
    def make() -> EnvAdapter:
        return gem_env("game:GuessTheNumber-v0-hard", global_random=global_random)

    assert _serial_and_concurrent(make, range(16)) == 0
    if global_random is None:
        env = make()
        env.reset(seed=0)
        assert env.global_random is True, "a reset that seeds the global random state is detected"
    _check_concurrent_resets(make(), list(range(8)), make, threads=8, rounds=4)


def test_register_thirdparty() -> None:
    ids = register_thirdparty("gem")
    assert "gem/game.Sudoku-v0-easy" in ids
    env = gymnasium.make("gem/game.Sudoku-v0-easy", disable_env_checker=True)
    assert isinstance(env.unwrapped, EnvAdapter) and env.reset(seed=0)[1]["task_id"].startswith("gem/game.Sudoku")


def test_step_result_is_what_hooks_see() -> None:
    seen: list[StepResult] = []
    env = gem_env("game:GuessTheNumber-v0-easy", success=lambda r: seen.append(r) or False)
    run_episode(env, lambda e, m: "no guess", seed=0)
    assert len(seen) == 1 and seen[0].terminated and seen[0].turn == 1 and seen[0].messages
