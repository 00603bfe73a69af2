"""Many env instances in parallel threads: no shared state, and one crashing episode stays contained."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import gymnasium

import taurl.envs  # noqa: F401  (registers the ids)
from taurl.envs import Task, calculator, game, run_episode, sql
from taurl.envs.calculator import CalculatorEnv

POLICIES = {
    "taurl/Calculator-v0": calculator.oracle_policy,
    "taurl/SQL-v0": sql.oracle_policy,
    "taurl/GuessNumber-v0": game.oracle_policy,
}


def play(env_id: str, seed: int) -> tuple[str, list[float], list[dict], str | None]:
    env = gymnasium.make(env_id, split="heldout" if seed % 2 else "train")
    results = [run_episode(env, POLICIES[env_id], seed=seed + k) for k in range(5)]
    env.close()
    return ("|".join(r.task_id for r in results), [x for r in results for x in r.rewards],
            [m for r in results for m in r.messages], next((r.error for r in results if r.error), None))


def test_parallel_episodes_match_sequential() -> None:
    jobs = [(env_id, seed) for env_id in POLICIES for seed in range(12)]
    sequential = [play(*job) for job in jobs]
    with ThreadPoolExecutor(max_workers=16) as pool:
        parallel = list(pool.map(lambda job: play(*job), jobs))
    assert parallel == sequential
    assert all(error is None for *_, error in sequential)


class SometimesCrashes(CalculatorEnv):
    """A buggy scorer: crashes on tasks whose answer is odd."""

    def score(self, task: Task, answer: str) -> bool:
        if int(task.answer) % 2:
            raise RuntimeError(f"scorer bug on {task.id}")
        return super().score(task, answer)


def test_a_crash_is_reported_on_its_episode_only() -> None:
    def one(seed: int) -> tuple[int, str | None, bool | None]:
        env = SometimesCrashes()
        result = run_episode(env, calculator.oracle_policy, seed=seed)
        return int(env.task.answer), result.error, result.success

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(one, range(40)))
    crashed = [o for o in outcomes if o[1] is not None]
    assert crashed and len(crashed) < len(outcomes)
    for answer, error, success in outcomes:
        if answer % 2:
            assert error.startswith("RuntimeError: scorer bug on calc/train/")
        else:
            assert error is None and success is True
