"""Rollouts whose episodes are runs of an agent program talking to :class:`OpenAIEndpoint`.

``taurl rollout --agent-cmd "python my_agent.py"`` runs the command ``num_tasks ×
samples_per_task`` times, up to ``max_in_flight`` at once, each run one session of the
endpoint. Each run's environment holds:

- ``OPENAI_BASE_URL``: the endpoint (``http://127.0.0.1:PORT/v1``);
- ``OPENAI_API_KEY``: the run's session key (the official client reads both variables);
- ``TAURL_TASK_SEED``: the task's seed, the same for the samples of one group;
  ``TAURL_TASK_INDEX`` and ``TAURL_SAMPLE_INDEX``: which task and sample;
- ``TAURL_REWARD_FILE``: where the program writes its reward before it exits, as JSON:
  a number, or ``{"reward": 1.0, "success": true}``.

A run that exits non-zero, times out, or writes no readable reward is an ``"error"``
episode (reward 0, the reason in ``info["error"]``); its tokens are still recorded.
The trajectories go to JSONL as runs finish, in the same order and with the same
group ids and seeds as :func:`taurl.rollout.runner.run_rollout`.

A Python agent plugs in the same way through :func:`run_agent_programs`: an async
function that gets an :class:`AgentRun` (base URL, session key, seeds) and returns an
:class:`AgentOutcome`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from taurl.agents.loop import Agent, derive_seed
from taurl.errors import ConfigError
from taurl.rollout.metrics import summarize_rollout
from taurl.rollout.openai_endpoint import OpenAIEndpoint
from taurl.rollout.runner import (
    RolloutConfig,
    RolloutResult,
    for_each_sample,
    group_id_of,
    task_seed,
)
from taurl.types import Trajectory

#: ``env_id`` of the trajectories of agent-program rollouts.
AGENT_ENV_ID = "agent-cmd"


@dataclass
class AgentCmdConfig:
    """``taurl rollout --agent-cmd``: run an OpenAI-client agent program instead of an environment."""

    # shell command run once per episode against the endpoint ("" = play rollout.env_id instead)
    command: str = ""
    # seconds one run may take; a run still going then is killed and recorded as an "error" episode
    timeout_s: float = 600.0
    # tool-call format read from completions when a request has tools: "auto" or "tags"
    parser: str = "auto"

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"AgentCmdConfig.timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class AgentRun:
    """What one run of an agent program gets."""

    base_url: str  # the endpoint, for OpenAI(base_url=...)
    session_key: str  # the API key that names this run's session
    task_seed: int  # the task's seed (shared by its group's samples)
    task_index: int
    sample_index: int


@dataclass(frozen=True)
class AgentOutcome:
    """How one run ended: its reward, the program's verdict, or why it failed."""

    reward: float = 0.0
    success: bool | None = None
    error: str | None = None  # set when the run failed; the episode is then an "error"


AgentProgram = Callable[[AgentRun], Awaitable[AgentOutcome]]


def read_reward_file(path: Path) -> AgentOutcome:
    """The outcome a program wrote to ``TAURL_REWARD_FILE`` (a number or ``{"reward", "success"}``)."""
    if not path.is_file() or not path.read_text().strip():
        return AgentOutcome(error=f"the agent wrote no reward to TAURL_REWARD_FILE ({path}); write "
                            'e.g. {"reward": 1.0} there before exiting')
    text = path.read_text()
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            success = data.get("success")
            return AgentOutcome(reward=float(data["reward"]),
                                success=None if success is None else bool(success))
        return AgentOutcome(reward=float(data))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return AgentOutcome(error=f'TAURL_REWARD_FILE holds {text[:200]!r}; expected a number or {{"reward": <number>}}')


def command_program(command: str, timeout_s: float) -> AgentProgram:
    """An :data:`AgentProgram` that runs ``command`` in a shell with the run's variables set."""

    async def run(agent_run: AgentRun) -> AgentOutcome:
        with tempfile.TemporaryDirectory(prefix="taurl-agent-") as tmp:
            reward_file = Path(tmp) / "reward.json"
            env = {
                **os.environ,
                "OPENAI_BASE_URL": agent_run.base_url,
                "OPENAI_API_KEY": agent_run.session_key,
                "TAURL_TASK_SEED": str(agent_run.task_seed),
                "TAURL_TASK_INDEX": str(agent_run.task_index),
                "TAURL_SAMPLE_INDEX": str(agent_run.sample_index),
                "TAURL_REWARD_FILE": str(reward_file),
            }
            proc = await asyncio.create_subprocess_shell(
                command, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group: a timeout kills the agent's children too
            )
            try:
                _, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
                return AgentOutcome(error=f"the agent command ran over {timeout_s} s and was killed")
            if proc.returncode != 0:
                tail = stderr.decode(errors="replace").strip()[-1000:]
                return AgentOutcome(error=f"the agent command exited with status {proc.returncode}: {tail}")
            return read_reward_file(reward_file)

    return run


async def run_agent_programs(
    endpoint: OpenAIEndpoint,
    program: AgentProgram,
    config: RolloutConfig,
    *,
    output: str | Path | None = None,
    env_id: str = AGENT_ENV_ID,
) -> RolloutResult:
    """Run ``program`` ``num_tasks × samples_per_task`` times, up to ``max_in_flight`` at once.

    Each run is a fresh session of ``endpoint`` (an open one); its trajectories (one per
    segment, see :mod:`taurl.rollout.openai_endpoint`) are appended to ``output`` as the
    run ends. Seeds and group ids are those of :func:`~taurl.rollout.runner.run_rollout`
    with ``env_id``; ``config.env_id`` and the env settings are not used.
    """
    slots = asyncio.Semaphore(config.max_in_flight)
    results: dict[tuple[int, int], list[Trajectory]] = {}
    sink: IO[str] | None = open(output, "w", encoding="utf-8") if output is not None else None  # noqa: SIM115, ASYNC230
    t_start = time.perf_counter()

    async def one(i: int, j: int) -> None:
        task_index = config.task_offset + i
        seed = task_seed(config.seed, env_id, config.split, task_index)
        group_id = group_id_of(env_id, config.split, task_index, seed)
        key = endpoint.new_session(
            "taurl", sample_seed=derive_seed(config.seed, env_id, config.split, task_index, j)
        )
        async with slots:
            t0 = time.perf_counter()
            try:
                outcome = await program(AgentRun(endpoint.base_url, key, seed, task_index, j))
            except Exception as exc:  # noqa: BLE001 - a crashing agent ends its episode, not the run
                outcome = AgentOutcome(error=f"the agent program raised {type(exc).__name__}: {exc}")
            info = {"error": outcome.error} if outcome.error else {}
            trajs = await endpoint.finish(
                key, 0.0 if outcome.error else outcome.reward,
                termination="error" if outcome.error else "terminated", success=outcome.success,
                group_id=group_id, env_id=env_id, task_id=str(task_index), seed=seed, info=info,
            )
            if not trajs:
                trajs = [Trajectory(
                    token_ids=[], loss_mask=[], logprobs=[], turn_ids=[], rewards=[], episode_return=0.0,
                    termination="error", env_id=env_id, task_id=str(task_index), seed=seed,
                    group_id=group_id, policy_version=int(endpoint.backend.policy_version),
                    info={"error": outcome.error or "the agent made no chat completion request"},
                )]
            for traj in trajs:
                traj.timing["total_s"] = time.perf_counter() - t0
            results[(i, j)] = trajs
            if sink is not None:
                sink.writelines(t.to_json() + "\n" for t in trajs)
                sink.flush()

    try:
        await for_each_sample(config, one)
    finally:
        if sink is not None:
            sink.close()
    trajectories = [t for key in sorted(results) for t in results[key]]
    return RolloutResult(trajectories, summarize_rollout(trajectories, time.perf_counter() - t_start))


def run_agent_cmd(
    agent: Agent, config: AgentCmdConfig, rollout: RolloutConfig, *, output: str | Path | None = None
) -> RolloutResult:
    """``taurl rollout --agent-cmd``: serve ``agent``'s backend and tokenizer and run the command.

    Requests that name no sampling settings take ``rollout.agent.sampling``'s.
    """
    with OpenAIEndpoint(agent.backend, agent.renderer.tokenizer, sampling=rollout.agent.sampling,
                        parser=config.parser, drift_check=rollout.agent.drift_check) as endpoint:
        program = command_program(config.command, config.timeout_s)
        return asyncio.run(run_agent_programs(endpoint, program, rollout, output=output))
