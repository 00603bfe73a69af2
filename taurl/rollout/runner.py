"""The rollout runner: N tasks × G samples, up to K episodes in flight, JSONL as they finish.

Every episode is its own coroutine (:meth:`taurl.agents.loop.Agent.run_episode`);
there is no lockstep across the batch: a semaphore holds K slots and a finished
episode frees its slot at once, so the backend always has up to K requests to batch.
Environments are made, reset and stepped in a thread pool, off the event loop.

Reproducibility: task ``i`` of a run is reset with ``derive_seed(seed, env_id, split,
task_offset + i)`` — the same for its G samples, which form one group — and sample
``j`` samples with per-request seeds derived from ``(seed, env_id, split, task, j)``.

A crash in an environment (or in making one) marks that episode ``"error"`` with the
message in ``info["error"]`` (and the traceback's last frames in ``info["traceback"]``)
and the run goes on; the summary counts them, :mod:`taurl.rollout.failures` reports
the first. An error of
the backend itself ends the run (every episode would fail the same way).

Environments come from ``gymnasium.make`` unless ``make_env`` says otherwise (e.g. a
pool of Ray env workers, :mod:`taurl.rollout.ray_envs`). When the process holding an
episode's environment dies (:class:`~taurl.errors.EnvWorkerLost`), the episode is
played again from ``reset`` with the same seeds and its partial trajectory dropped:
no episode is lost or counted twice (``info["env_restarts"]`` says how often).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import gymnasium

import taurl.envs  # noqa: F401 - registers the built-in environments with Gymnasium
from taurl.agents.loop import Agent, AgentConfig, derive_seed, traceback_summary
from taurl.envs.base import SPLITS
from taurl.errors import ConfigError, EnvWorkerLost
from taurl.rollout.metrics import RolloutSummary, summarize_rollout
from taurl.types import JSONValue, Trajectory

#: Times one episode is played again after its environment's process died, before it
#: is recorded as an ``"error"`` episode.
MAX_ENV_RESTARTS = 8


class EnvFactory(Protocol):
    """Makes an environment the way ``gymnasium.make(env_id, **kwargs)`` does."""

    def __call__(self, env_id: str, /, **kwargs: JSONValue) -> gymnasium.Env: ...


@dataclass
class RolloutConfig:
    """Which episodes a rollout runs and how many at once."""

    # Gymnasium id of the environment, e.g. "taurl/Calculator-v0"
    env_id: str = "taurl/Calculator-v0"
    # task split: "train" or "heldout"
    split: str = "train"
    # extra constructor arguments for gymnasium.make (difficulty knobs, max_turns, ...)
    env_kwargs: dict[str, JSONValue] = field(default_factory=dict)
    # N: distinct tasks (groups)
    num_tasks: int = 8
    # G: samples per task (a GRPO group)
    samples_per_task: int = 4
    # K: episodes in flight at once
    max_in_flight: int = 32
    # base seed of task and sampling seeds
    seed: int = 0
    # index of the first task (e.g. iteration * num_tasks, so each iteration sees new tasks)
    task_offset: int = 0
    # threads that make, reset and step environments
    env_workers: int = 8
    # show a progress bar with episodes/s and tokens/s
    progress: bool = True
    # the agent: turns, context, sampling
    agent: AgentConfig = field(default_factory=AgentConfig)
    # training only: 0 = rollout, then update (synchronous); k >= 1 = the next batch is sampled
    # while the learner trains on this one, from weights at most k optimizer steps old
    max_off_policy_steps: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"RolloutConfig.split must be one of {SPLITS}, got {self.split!r}")
        for name in ("num_tasks", "samples_per_task", "max_in_flight", "env_workers"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"RolloutConfig.{name} must be >= 1, got {value}")
        for name in ("task_offset", "max_off_policy_steps"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"RolloutConfig.{name} must be >= 0, got {value}")


@dataclass
class RolloutResult:
    """Trajectories ordered by (task, sample) — group members adjacent — and the summary."""

    trajectories: list[Trajectory]
    summary: RolloutSummary


def task_seed(seed: int, env_id: str, split: str, task_index: int) -> int:
    """The reset seed of task ``task_index`` (shared by every sample of its group)."""
    return derive_seed(seed, env_id, split, "task", task_index)


def group_id_of(env_id: str, split: str, task_index: int, seed: int) -> str:
    """The group id of task ``task_index``: readable and unique within a run."""
    return f"{env_id}:{split}:{task_index}:{seed}"


async def for_each_sample(config: RolloutConfig, one: Callable[[int, int], Awaitable[None]]) -> None:
    """Run ``one(i, j)`` for every task ``i < num_tasks`` and sample ``j < samples_per_task`` at once.

    The runs share one task group: the first exception cancels the others and is raised
    in an ``ExceptionGroup``. ``one`` bounds its own concurrency (a ``max_in_flight``
    semaphore), so every run can start at once.
    """
    async with asyncio.TaskGroup() as tg:
        for i in range(config.num_tasks):
            for j in range(config.samples_per_task):
                tg.create_task(one(i, j))


def _error_trajectory(
    env_id: str, group_id: str, seed: int, policy_version: int, message: str,
    exc: BaseException | None = None,
) -> Trajectory:
    info: dict[str, JSONValue] = {"error": message}
    if exc is not None:
        info["traceback"] = traceback_summary(exc)
    return Trajectory(
        token_ids=[], loss_mask=[], logprobs=[], turn_ids=[], rewards=[], episode_return=0.0,
        termination="error", env_id=env_id, seed=seed, group_id=group_id,
        policy_version=policy_version, info=info,
    )


async def run_rollout(
    agent: Agent,
    config: RolloutConfig,
    *,
    output: str | Path | None = None,
    on_trajectory: Callable[[Trajectory], None] | None = None,
    make_env: EnvFactory | None = None,
) -> RolloutResult:
    """Run ``num_tasks × samples_per_task`` episodes with up to ``max_in_flight`` at once.

    Args:
        agent: Its backend (shared by all episodes) and tokenizer play each episode.
        config: Which env, split, tasks and how many in flight; ``config.agent`` sets the
            turns, context and sampling, whatever ``agent.config`` says.
        output: A JSONL file; each trajectory is appended (and flushed) as it finishes.
        on_trajectory: Called with each trajectory as it finishes (e.g. a streaming learner).
        make_env: Builds each episode's environment (default ``gymnasium.make``).
    """
    if agent.config != config.agent:
        # One Agent serves runs with different limits and sampling (the trainer's held-out
        # evaluation is greedy, its rollouts are not) on the same live engine and weights.
        agent = Agent(agent.backend, agent.renderer.tokenizer, config.agent)
    slots = asyncio.Semaphore(config.max_in_flight)
    executor = ThreadPoolExecutor(max_workers=config.env_workers, thread_name_prefix="taurl-env")
    results: dict[tuple[int, int], Trajectory] = {}
    sampled_tokens = 0
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=config.num_tasks * config.samples_per_task, unit="ep", desc=f"rollout {config.env_id}"
        )
    # Opened once per run (not per episode), so a blocking open on the loop costs nothing.
    sink: IO[str] | None = open(output, "w", encoding="utf-8") if output is not None else None  # noqa: SIM115, ASYNC230
    t_start = time.perf_counter()

    make: EnvFactory = make_env or gymnasium.make  # type: ignore[assignment]

    def new_env() -> gymnasium.Env:
        return make(config.env_id, split=config.split, disable_env_checker=True, **config.env_kwargs)

    async def one(i: int, j: int) -> None:
        nonlocal sampled_tokens
        task_index = config.task_offset + i
        seed = task_seed(config.seed, config.env_id, config.split, task_index)
        group_id = group_id_of(config.env_id, config.split, task_index, seed)
        loop = asyncio.get_running_loop()

        async def play() -> Trajectory:
            try:
                env = await loop.run_in_executor(executor, new_env)
            except EnvWorkerLost:
                raise
            except Exception as exc:  # noqa: BLE001 - a broken env ends its episode, not the run
                return _error_trajectory(
                    config.env_id, group_id, seed, int(agent.backend.policy_version),
                    f"gymnasium.make({config.env_id!r}) failed: {type(exc).__name__}: {exc}", exc,
                )
            try:
                return await agent.run_episode(
                    env,
                    seed=seed,
                    sample_seed=derive_seed(config.seed, config.env_id, config.split, task_index, j),
                    env_id=config.env_id,
                    group_id=group_id,
                    executor=executor,
                )
            finally:
                await loop.run_in_executor(executor, env.close)

        async with slots:
            for restarts in range(MAX_ENV_RESTARTS + 1):
                try:
                    traj = await play()
                except EnvWorkerLost as exc:
                    if restarts < MAX_ENV_RESTARTS:
                        continue  # the environment's state is gone: play the episode again
                    traj = _error_trajectory(
                        config.env_id, group_id, seed, int(agent.backend.policy_version),
                        f"the environment's worker died {restarts + 1} times; last: {exc}",
                    )
                if restarts:
                    traj.info["env_restarts"] = restarts
                break
        results[(i, j)] = traj
        sampled_tokens += traj.num_sampled_tokens
        if sink is not None:
            sink.write(traj.to_json() + "\n")
            sink.flush()
        if on_trajectory is not None:
            on_trajectory(traj)
        if bar is not None:
            elapsed = max(time.perf_counter() - t_start, 1e-9)
            bar.set_postfix({"tok/s": f"{sampled_tokens / elapsed:.0f}"}, refresh=False)
            bar.update(1)

    try:
        await for_each_sample(config, one)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        if sink is not None:
            sink.close()
        if bar is not None:
            bar.close()
    wall_s = time.perf_counter() - t_start
    trajectories = [results[key] for key in sorted(results)]
    return RolloutResult(trajectories=trajectories, summary=summarize_rollout(trajectories, wall_s))

