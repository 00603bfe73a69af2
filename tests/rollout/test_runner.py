"""The rollout runner and `taurl eval`'s body on real environments and the shared vLLM engine."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import nullcontext
from pathlib import Path

import gymnasium
import pytest
from transformers import AutoTokenizer

from taurl.agents.loop import Agent, AgentConfig
from taurl.cli import build_parser, eval_command
from taurl.envs import register_env
from taurl.errors import EnvWorkerLost
from taurl.rollout.commands import EvalCommand, run_eval_command
from taurl.rollout.eval import EvalConfig, evaluate
from taurl.rollout.grouping import group_trajectories
from taurl.rollout.runner import MAX_ENV_RESTARTS, RolloutConfig, run_rollout, task_seed
from taurl.types import SamplingParams, read_jsonl

pytestmark = pytest.mark.vllm


class EchoEnv(gymnasium.Env):
    """Test-only env: one turn; reset fails for seeds divisible by 3, step sleeps for ``slow_seed``."""

    def __init__(self, split: str = "train", slow_seed: int | None = None, crash: bool = False):
        self.slow_seed, self.crash = slow_seed, crash

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if self.crash and seed % 3 == 0:
            raise ValueError(f"task file for seed {seed} is corrupt")
        self.seed_ = seed
        return [{"role": "user", "content": f"Task {seed}"}], {"task_id": str(seed), "tools": []}

    def step(self, action):
        if self.seed_ == self.slow_seed:
            time.sleep(1.5)
        return [], 1.0, True, False, {"success": True}


register_env("taurl-test/Echo-v0", EchoEnv)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: Path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def agent_config(max_turns: int = 2, max_tokens: int = 6, temperature: float = 1.0) -> AgentConfig:
    return AgentConfig(max_turns=max_turns, sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature))


def test_groups_jsonl_policy_version_and_summary(vllm_tiny, tokenizer, tmp_path):
    cfg = RolloutConfig(env_id="taurl/GuessNumber-v0", num_tasks=3, samples_per_task=2, max_in_flight=4,
                        seed=7, progress=True, agent=agent_config())
    seen = []
    out = tmp_path / "t.jsonl"
    result = asyncio.run(run_rollout(Agent(vllm_tiny, tokenizer, cfg.agent), cfg, output=out, on_trajectory=seen.append))
    trajs = result.trajectories
    assert len(trajs) == 6 and len(seen) == 6
    # the file holds the same trajectories, in the order they finished
    assert read_jsonl(out) == seen
    assert sorted(t.to_json() for t in seen) == sorted(t.to_json() for t in trajs)
    groups = group_trajectories(trajs)
    assert [len(g) for g in groups] == [2, 2, 2]
    for i, group in enumerate(groups):
        seed = task_seed(7, "taurl/GuessNumber-v0", "train", i)
        assert {(t.seed, t.task_id, t.group_id) for t in group} == {(seed, group[0].task_id, group[0].group_id)}
        # the two samples of a group draw different tokens (different per-request seeds)
        assert group[0].token_ids != group[1].token_ids
    assert len({g[0].group_id for g in groups}) == 3
    assert {t.policy_version for t in trajs} == {vllm_tiny.policy_version}
    s = result.summary
    assert s.episodes == 6 and s.errors == 0 and s.terminations == {"max_turns": 6}
    assert s.sampled_tokens == sum(t.num_sampled_tokens for t in trajs) and s.tokens_per_s > 0
    assert s.policy_versions == [vllm_tiny.policy_version]


def test_a_crashing_env_marks_its_episodes_error_and_the_run_continues(vllm_tiny, tokenizer):
    cfg = RolloutConfig(env_id="taurl-test/Echo-v0", env_kwargs={"crash": True}, num_tasks=8,
                        samples_per_task=1, progress=False, agent=agent_config())
    result = asyncio.run(run_rollout(Agent(vllm_tiny, tokenizer, cfg.agent), cfg))
    crashing = [task_seed(0, "taurl-test/Echo-v0", "train", i) % 3 == 0 for i in range(8)]
    assert 0 < sum(crashing) < 8
    for traj, crashed in zip(result.trajectories, crashing, strict=True):
        if crashed:
            assert traj.termination == "error" and "task file for seed" in traj.info["error"]
        else:
            assert traj.termination == "terminated" and traj.success is True
    assert result.summary.errors == sum(crashing)
    # an env that cannot even be made: every episode is an error, the run still returns
    cfg = RolloutConfig(env_id="taurl-test/Echo-v0", env_kwargs={"no_such_arg": 1}, num_tasks=2,
                        samples_per_task=1, progress=False, agent=agent_config())
    result = asyncio.run(run_rollout(Agent(vllm_tiny, tokenizer, cfg.agent), cfg))
    assert result.summary.errors == 2 and "no_such_arg" in result.trajectories[0].info["error"]


def test_no_lockstep_a_finished_episode_frees_its_slot(vllm_tiny, tokenizer):
    # K=2; task 0's env step sleeps 1.5 s off the event loop. Without lockstep, tasks 1, 2
    # and 3 all start and finish through the other slot while task 0 is still stepping.
    slow = task_seed(0, "taurl-test/Echo-v0", "train", 0)
    cfg = RolloutConfig(env_id="taurl-test/Echo-v0", env_kwargs={"slow_seed": slow}, num_tasks=4,
                        samples_per_task=1, max_in_flight=2, progress=False, agent=agent_config(max_tokens=2))
    order = []
    asyncio.run(run_rollout(Agent(vllm_tiny, tokenizer, cfg.agent), cfg, on_trajectory=lambda t: order.append(t.seed)))
    assert order[-1] == slow and len(order) == 4


class LosesItsWorker(gymnasium.Wrapper):
    """Stands in for an env in a worker process that dies: ``step`` raises EnvWorkerLost.

    ``doomed_seed``: every episode of that task loses its worker on reset, each time it is
    tried; other episodes lose it on their second step while ``budget[0] > 0``.
    """

    def __init__(self, env, budget, doomed_seed):
        super().__init__(env)
        self.budget, self.doomed_seed, self.steps = budget, doomed_seed, 0

    def reset(self, *, seed=None, options=None):
        if seed == self.doomed_seed:
            raise EnvWorkerLost("worker gone (reset)")
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        self.steps += 1
        if self.steps == 2 and self.budget[0] > 0:
            self.budget[0] -= 1
            raise EnvWorkerLost("worker gone (step)")
        return self.env.step(action)


def test_episodes_whose_env_worker_died_are_played_again_exactly_once(vllm_tiny, tokenizer):
    cfg = RolloutConfig(env_id="taurl/GuessNumber-v0", num_tasks=3, samples_per_task=2, seed=5,
                        progress=False, agent=agent_config(max_turns=3))
    agent = Agent(vllm_tiny, tokenizer, cfg.agent)
    reference = asyncio.run(run_rollout(agent, cfg)).trajectories
    doomed = task_seed(5, "taurl/GuessNumber-v0", "train", 2)
    budget = [3]
    made = []

    def make_env(env_id, /, **kwargs):
        made.append(env_id)
        return LosesItsWorker(gymnasium.make(env_id, **kwargs), budget, doomed)

    seen = []
    result = asyncio.run(run_rollout(agent, cfg, make_env=make_env, on_trajectory=seen.append))
    trajs = result.trajectories
    assert len(seen) == len(trajs) == 6 and budget == [0]
    # the partial episodes were dropped and played again with the same seeds
    for got, want in zip(trajs[:4], reference[:4], strict=True):
        assert got.termination != "error" and got.token_ids == want.token_ids
    assert sum(t.info.get("env_restarts", 0) for t in trajs[:4]) == 3
    # a task whose worker is lost every time ends as an error after MAX_ENV_RESTARTS tries
    for t in trajs[4:]:
        assert t.termination == "error" and f"died {MAX_ENV_RESTARTS + 1} times" in t.info["error"]
    assert len(made) == 6 + 3 + 2 * MAX_ENV_RESTARTS


def test_eval_command_is_deterministic_and_compares(vllm_tiny, tmp_path):
    def cmd(out: Path, compare: str | None = None) -> EvalCommand:
        return EvalCommand(
            model="tiny-random", compare=compare, out_dir=str(out),
            eval=EvalConfig(envs=["taurl/Calculator-v0", "taurl/GuessNumber-v0"], episodes=3, progress=False,
                            agent=agent_config(max_turns=2, max_tokens=8, temperature=0.0)),
        )

    def opener(model: str):
        return nullcontext(vllm_tiny)

    a = run_eval_command(cmd(tmp_path / "a"), opener)
    b = run_eval_command(cmd(tmp_path / "b"), opener)
    ma, mb = a.results["tiny-random"], b.results["tiny-random"]
    assert list(ma) == ["taurl/Calculator-v0", "taurl/GuessNumber-v0"]
    for env_id in ma:
        da, db = ma[env_id].to_dict(), mb[env_id].to_dict()
        for timing in ("wall_s", "tokens_per_s"):
            da.pop(timing), db.pop(timing)
        assert da == db
    ta = read_jsonl(tmp_path / "a" / "trajectories-tiny-random-taurl_GuessNumber-v0.jsonl")
    tb = read_jsonl(tmp_path / "b" / "trajectories-tiny-random-taurl_GuessNumber-v0.jsonl")
    assert [t.token_ids for t in ta] == [t.token_ids for t in tb]
    saved = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert saved["results"]["tiny-random"]["taurl/Calculator-v0"]["episodes"] == 3
    md = (tmp_path / "a" / "eval.md").read_text()
    assert md.count("\n") == 4 and "| taurl/GuessNumber-v0 | tiny-random | 3 |" in md
    # the same model on both sides, greedy: every paired difference is exactly 0
    c = run_eval_command(cmd(tmp_path / "c", compare="tiny-random"), opener)
    assert c.models == ["tiny-random (1)", "tiny-random (2)"]
    assert [(x.pairs, x.return_diff, x.success_diff) for x in c.comparisons] == [(3, 0.0, 0.0)] * 2
    assert "Δ (tiny-random (2) − tiny-random (1))" in (tmp_path / "c" / "eval.md").read_text()


def test_the_rollout_configs_agent_samples_not_the_agent_objects(vllm_tiny, tokenizer, record_sampling):
    """The trainer evaluates with its training Agent: the eval config's greedy sampling must win."""
    backend = record_sampling(vllm_tiny)
    training = Agent(backend, tokenizer, agent_config(max_turns=2, max_tokens=6, temperature=1.0))
    cfg = RolloutConfig(env_id="taurl/GuessNumber-v0", num_tasks=2, samples_per_task=1, progress=False,
                        agent=agent_config(max_turns=1, max_tokens=3, temperature=0.0))
    result = asyncio.run(run_rollout(training, cfg))
    assert backend.requests and {(s.temperature, s.max_tokens) for _, s in backend.requests} == {(0.0, 3)}
    assert {t.termination for t in result.trajectories} == {"max_turns"}
    backend.requests.clear()
    asyncio.run(evaluate(training, EvalConfig(envs=["taurl/GuessNumber-v0"], episodes=2, progress=False)))
    assert backend.requests and {s.temperature for _, s in backend.requests} == {0.0}
    assert training.config.sampling.temperature == 1.0  # the caller's Agent is left as it was


@pytest.mark.parametrize("flag", [["--max-turns", "1"], ["--max-tokens", "4"]])
def test_taurl_eval_with_an_agent_flag_samples_greedily(flag, vllm_tiny, record_sampling, tmp_path):
    argv = ["eval", "--model", "tiny-random", "--env", "taurl/GuessNumber-v0", "--episodes", "2",
            "--out", str(tmp_path), "--no-progress", *flag]
    backend = record_sampling(vllm_tiny)
    run_eval_command(eval_command(build_parser().parse_args(argv)), lambda model: nullcontext(backend))
    assert backend.requests and {s.temperature for _, s in backend.requests} == {0.0}
    recorded = json.loads((tmp_path / "eval.json").read_text())["config"]["eval"]["agent"]
    assert recorded["sampling"]["temperature"] == 0.0
    assert (recorded["max_turns"], recorded["sampling"]["max_tokens"]) == ((1, 256) if "--max-turns" in flag else (8, 4))
