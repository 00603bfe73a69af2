"""`taurl train`: a 2-iteration run per preset on the tiny model, resume, config guards."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import gymnasium
import numpy as np
import pytest
from safetensors.torch import load_file

from taurl.config import load_config
from taurl.envs.base import Task, TextEnv, Turn, user
from taurl.errors import ConfigError, TaurlError
from taurl.learners.checkpoint import saved_weights
from taurl.trainer import RunDir, TrainConfig, load_run_config, train_async
from taurl.types import Trajectory

ENV_ID = "taurl-test/Variety-v0"


class VarietyEnv(TextEnv):
    """Two turns; each rewards the number of distinct characters written.

    The random tiny model scores differently on every sample, so every group has reward
    variance and every preset gets a gradient: this tests the loop's wiring, not learning.
    """

    def __init__(self, split: str = "train", **kwargs: object) -> None:
        super().__init__(split, max_turns=2, **kwargs)  # type: ignore[arg-type]

    def make_task(self, rng: np.random.Generator) -> Task:
        n = int(rng.integers(1000))
        return Task(f"{self.split}/{n}", f"Say something about the number {n}.",
                    privileged_context=f"A good answer mentions {n}.")

    def turn(self, action: str) -> Turn:
        reward = len(set(action)) / 40
        last = self.turn_index == 1
        return Turn([] if last else [user("Say more.")], reward, last, {"success": reward > 0.3})


if ENV_ID not in gymnasium.registry:
    gymnasium.register(ENV_ID, entry_point=VarietyEnv)

BROKEN_ENV_ID = "taurl-test/BrokenReset-v0"


class BrokenResetEnv(VarietyEnv):
    """VarietyEnv whose task source is broken: every ``reset`` raises."""

    def make_task(self, rng: np.random.Generator) -> Task:
        raise FileNotFoundError("tasks.jsonl is missing")


if BROKEN_ENV_ID not in gymnasium.registry:
    gymnasium.register(BROKEN_ENV_ID, entry_point=BrokenResetEnv)


def tiny_config(tmp_path: Path, algorithm: str, **over: str) -> TrainConfig:
    overrides = {
        "model": "tiny-random", "run_dir": str(tmp_path / algorithm), "iterations": "2",
        "rollout.env_id": ENV_ID, "rollout.num_tasks": "2", "rollout.samples_per_task": "2",
        "rollout.progress": "false", "rollout.agent.max_turns": "2",
        "rollout.agent.sampling.max_tokens": "12", "learner.algorithm": algorithm,
        "learner.lr": "1e-3", "eval_every": "2", "eval_episodes": "2", "tensorboard": "false",
    }
    overrides.update(over)
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in overrides.items()])


def _weights(run_dir: Path, file: str = "policy/model.safetensors") -> dict[str, np.ndarray]:
    """The latest checkpoint's ``file``, or with ``file="learner"`` the learner's weights."""
    ckpt = RunDir(run_dir).latest_checkpoint()
    assert ckpt is not None
    state = saved_weights(ckpt / file) if file == "learner" else load_file(ckpt / file)
    return {k: v.float().numpy() for k, v in state.items()}


@pytest.mark.parametrize("algorithm", ["reinforce", "ppo", "grpo", "grpo_opd"])
def test_two_iterations_per_preset_change_the_policy(
    algorithm: str, tmp_path: Path, vllm_tiny_mutable, tiny_model_path: Path
) -> None:
    cfg = tiny_config(tmp_path, algorithm)
    run = asyncio.run(train_async(cfg, backend=vllm_tiny_mutable))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[-1]["policy_version"] >= 2 and vllm_tiny_mutable.policy_version >= 2
    assert rows[0]["rollout/termination/error"] == 0.0
    assert "eval/success" in rows[1] and "timing/sync_s" in rows[1]
    assert rows[-1]["timing/checkpoint_write_s"] > 0  # the last one is waited for
    assert all(r["traj/grad_norm"] > 0 for r in rows)
    before = load_file(tiny_model_path / "model.safetensors")
    after = _weights(run)
    changed = [k for k, v in before.items() if k in after and not np.allclose(v.float().numpy(), after[k])]
    assert len(after) == len(before) and changed, "no parameter changed after two updates"
    assert (run / "samples.md").read_text().count("### ") == 4
    # the learner's weights are the policy's, written once, unless a value head adds its own
    ckpt = RunDir(run).latest_checkpoint()
    assert (ckpt / "learner" / "model.safetensors").exists() == (algorithm == "ppo")
    saved = saved_weights(ckpt / "learner")  # tied tensors once, under one of their names
    assert len(saved) > len(after) if algorithm == "ppo" else saved.keys() == {
        f"policy.{k}" for k in after}


def test_held_out_evaluation_samples_greedily_on_the_live_engine(
    tmp_path: Path, vllm_tiny_mutable, record_sampling
) -> None:
    """Training samples at rollout.agent's temperature; the in-loop evaluation at 0."""
    backend = record_sampling(vllm_tiny_mutable)
    cfg = tiny_config(tmp_path, "grpo", iterations="1", eval_every="1",
                      **{"rollout.agent.sampling.temperature": "1.0"})
    run = asyncio.run(train_async(cfg, backend=backend))
    used: dict[str, set[tuple[float, int]]] = {"train": set(), "heldout": set()}
    for session_id, sampling in backend.requests:
        used[session_id.split(":")[-3]].add((sampling.temperature, sampling.max_tokens))
    assert used == {"train": {(1.0, 12)}, "heldout": {(0.0, 12)}}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "eval/success" in rows[0]


def test_resume_continues_like_an_uninterrupted_run(
    tmp_path: Path, vllm_tiny_mutable
) -> None:
    full = tiny_config(tmp_path, "grpo", run_dir=str(tmp_path / "full"), iterations="3")
    asyncio.run(train_async(full, backend=vllm_tiny_mutable))
    # The same run stopped after iteration 1, then resumed.
    part = tiny_config(tmp_path, "grpo", run_dir=str(tmp_path / "part"), iterations="3")
    part_stopped = tiny_config(tmp_path, "grpo", run_dir=str(tmp_path / "part"), iterations="3",
                               time_budget_min="1e-9")
    RunDir(part.run_dir).init(part)
    # run one iteration with a time budget that ends it, keeping the config file of `part`
    asyncio.run(train_async(part_stopped, resume=True, backend=vllm_tiny_mutable))
    asyncio.run(train_async(load_run_config(part.run_dir), resume=True, backend=vllm_tiny_mutable))
    a = [json.loads(x) for x in (Path(full.run_dir) / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (Path(part.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b, strict=True):
        assert ra["rollout/return"] == pytest.approx(rb["rollout/return"], abs=1e-9)
        assert ra["traj/policy_loss"] == pytest.approx(rb["traj/policy_loss"], rel=1e-3, abs=1e-6)
    exact = "learner"  # float32 master weights
    wa, wb = _weights(Path(full.run_dir), exact), _weights(Path(part.run_dir), exact)
    assert max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) < 1e-5


def test_async_rollout_bounds_staleness_and_a_resumed_run_loses_nothing(
    tmp_path: Path, vllm_tiny_mutable
) -> None:
    """max_off_policy_steps=1: batch i+1 samples while the learner trains on batch i."""
    over = {"rollout.max_off_policy_steps": "1", "iterations": "3", "eval_every": "0",
            "checkpoint_background": "true"}  # checkpoints written in a thread, too
    cfg = tiny_config(tmp_path, "grpo", **over)
    asyncio.run(train_async(cfg, backend=vllm_tiny_mutable))
    rows = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    # iteration 0 samples before any update; every later batch was sampled (started) during
    # the previous update, with weights one step old, and none was dropped
    assert [r["rollout/staleness_max"] for r in rows] == [0, 1, 1]
    assert all(r["rollout/stale_dropped"] == 0 for r in rows)

    # stopped by its time budget after iteration 0 (the batch sampled ahead is dropped)...
    part = tiny_config(tmp_path, "grpo", run_dir=str(tmp_path / "part"), **over)
    stopped = tiny_config(tmp_path, "grpo", run_dir=str(tmp_path / "part"), **over,
                          time_budget_min="1e-9", checkpoint_every="1")
    RunDir(part.run_dir).init(part)
    asyncio.run(train_async(stopped, resume=True, backend=vllm_tiny_mutable))
    # ...then resumed: it samples iteration 1's tasks again and ends where the whole run did
    asyncio.run(train_async(load_run_config(part.run_dir), resume=True, backend=vllm_tiny_mutable))
    rows = [json.loads(x) for x in (Path(part.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[-1]["policy_version"] == 3


def test_async_rollout_needs_room_for_a_whole_update() -> None:
    with pytest.raises(ConfigError, match="max_off_policy_steps >= 4"):
        load_config(TrainConfig, None, ["rollout.max_off_policy_steps=1",
                                        "learner.options.minibatches=2", "learner.options.epochs=2"])


def test_run_dir_refuses_another_config(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "grpo")
    RunDir(cfg.run_dir).init(cfg)
    other = tiny_config(tmp_path, "grpo", **{"learner.lr": "2e-3"})
    with pytest.raises(ConfigError, match=r"different config \(learner.lr: 0.001 there, 0.002 now\)"):
        RunDir(other.run_dir).init(other)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("learner.algoritm=grpo", "did you mean 'algorithm'"),
        ("rollout.split=heldout", "training samples the 'train' split"),
        ("backend.kind=vlm", "kind must be one of"),
        ("iterations=0", "iterations must be >= 1"),
        ("max_error_rate=1.5", r"max_error_rate must be in \[0, 1\]"),
    ],
)
def test_config_errors(override: str, needle: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=needle):
        load_config(TrainConfig, None, [override])


# `python -c` code running the taurl CLI with this file's test env registered (the test env
# lives in this file: a sitecustomize-free way to register it in a child process).
CLI_WITH_TEST_ENV = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_trainer; "
    "from taurl.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_sigkill_then_resume_loses_at_most_the_iteration_in_progress(tmp_path: Path) -> None:
    """A real `taurl train` process killed with SIGKILL mid-run, then `taurl train --resume`.

    The HF backend keeps this test free of a second vLLM engine start; the checkpoint
    logic under test is the same for every backend.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "killed"
    args = [
        "model=tiny-random", f"run_dir={run_dir}", "iterations=4", f"rollout.env_id={ENV_ID}",
        "rollout.num_tasks=2", "rollout.samples_per_task=2", "rollout.progress=false",
        "rollout.agent.sampling.max_tokens=8", "rollout.agent.max_turns=2", "eval_every=0",
        "tensorboard=false", "backend.kind=hf", "learner.lr=1e-3", "checkpoint_every=1",
    ]
    code = CLI_WITH_TEST_ENV
    proc = subprocess.Popen([sys.executable, "-c", code, "train", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert latest.exists(), "the first checkpoint never appeared"
    time.sleep(0.7)  # somewhere inside the next iteration (or its checkpoint write)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = RunDir(run_dir).latest_checkpoint()
    assert before is not None
    done = json.loads((before / "trainer.json").read_text())["iteration"]

    resumed = subprocess.run([sys.executable, "-c", code, "train", "--resume", str(run_dir)],
                             check=False, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {run_dir} at iteration {done + 1}" in resumed.stdout
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["policy_version"] == 4
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [] or all(n.endswith(".tmp") for n in leftovers)


def test_auto_checkpoints_keep_within_their_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from taurl import run_dir

    now = [0.0]
    monkeypatch.setattr(run_dir.time, "perf_counter", lambda: now[0])
    s = run_dir.CheckpointSchedule(every=0, budget=0.05, first=3)
    assert s.due(3)  # the first iteration of a run or a resume measures the cost
    now[0] = 2.0
    s.saved(2.0)  # 2 s -> the next one is due 2 * 0.95 / 0.05 = 38 s after this one ended
    now[0] = 39.0
    assert not s.due(4)
    now[0] = 40.0
    assert s.due(5)
    assert not s.due(5, busy=True)  # the previous one is still being written
    every = run_dir.CheckpointSchedule(every=2, budget=0.05, first=0)
    assert [every.due(i) for i in range(4)] == [False, True, False, True]
    assert every.due(1, busy=True)  # by count: the writer waits for the previous one


def test_background_checkpoint_writes_the_snapshot_and_reports_its_error(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    """What is written is the state at the snapshot, though training changes it meanwhile;
    the checkpoint loads; a failed write is raised on the training thread."""
    import torch

    from taurl.learners import Learner, LearnerConfig
    from taurl.run_dir import CheckpointWriter, snapshot_checkpoint

    learner = Learner(LearnerConfig(algorithm="grpo", lr=1e-3), tiny_model_path)

    def step() -> None:  # an optimizer step with made-up gradients
        for p in learner.trained_modules.parameters():
            p.grad = torch.ones_like(p)
        learner.optimizer.step()

    step()  # gives the optimizer a state to snapshot
    weights = {k: v.clone() for k, v in learner.trained_modules.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in learner.optimizer.state.values()]
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    costs: list[float] = []
    writer = CheckpointWriter(run, keep=2, on_done=costs.append)
    writer.start(snapshot_checkpoint(0, learner, tiny_model_path))
    step()  # training goes on while the checkpoint is written
    step()
    writer.wait()
    ckpt = run.latest_checkpoint()
    assert ckpt is not None and ckpt.name == "iter-000000" and len(costs) == 1
    assert writer.last_write_s is not None and costs[0] >= writer.last_write_s > 0
    saved = saved_weights(ckpt / "learner")
    assert saved and all(torch.equal(v, weights[k]) for k, v in saved.items())
    policy = load_file(ckpt / "policy" / "model.safetensors")
    assert all(torch.equal(v, weights[f"policy.{k}"]) for k, v in policy.items())
    # without LoRA or a value head the weights are written once, in the policy folder
    assert not (ckpt / "learner" / "model.safetensors").exists()
    restored = Learner(LearnerConfig(algorithm="grpo", lr=1e-3), tiny_model_path)
    restored.load(ckpt / "learner")
    for k, v in restored.trained_modules.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=0, rtol=0)
    for s, m in zip(restored.optimizer.state.values(), moments, strict=True):
        torch.testing.assert_close(s["exp_avg"], m, atol=0, rtol=0)

    # a file where the writer's temporary folder goes: the write fails in the thread
    (run.checkpoints / ".iter-000001.tmp").write_text("in the way")
    writer.start(snapshot_checkpoint(1, learner, tiny_model_path))
    with pytest.raises(NotADirectoryError):
        writer.wait()
    assert run.latest_checkpoint() == ckpt  # the previous checkpoint is intact
    writer.wait()  # the error was raised once


def _episode(error: str | None) -> Trajectory:
    info: dict = {} if error is None else {"error": error, "traceback": "Traceback ..."}
    return Trajectory(token_ids=[], loss_mask=[], logprobs=[], turn_ids=[], rewards=[],
                      episode_return=0.0, termination="error" if error else "terminated",
                      env_id=ENV_ID, info=info)


def test_error_rate_stops_only_above_max_error_rate(capsys: pytest.CaptureFixture[str]) -> None:
    from taurl.trainer import _check_errors

    cfg = TrainConfig(max_error_rate=0.5)
    reported: set[str] = set()
    _check_errors(cfg, 0, [_episode("boom 1"), _episode(None)], reported)  # 50%: not above
    _check_errors(cfg, 1, [_episode("boom 2"), _episode(None)], reported)
    err = capsys.readouterr().err
    assert "1/2 episodes ended in error; the first: boom 1" in err and "boom 2" not in err
    with pytest.raises(TaurlError, match=r"2 of 3 episodes \(67%\) of iteration 3 ended in error"):
        _check_errors(cfg, 2, [_episode("boom 3"), _episode("boom 4"), _episode(None)], reported)
    _check_errors(TrainConfig(max_error_rate=1.0), 0, [_episode("boom")] * 2, set())


def test_train_stops_on_a_broken_env_and_names_its_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`taurl train` on an env whose every reset raises: exit 2, the cause on stderr, no update."""
    from taurl.cli import main

    run_dir = tmp_path / "broken"
    code = main(["train", "model=tiny-random", f"run_dir={run_dir}", "iterations=2",
                 f"rollout.env_id={BROKEN_ENV_ID}", "rollout.num_tasks=2",
                 "rollout.samples_per_task=2", "rollout.progress=false", "eval_every=0",
                 "tensorboard=false", "backend.kind=hf"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"taurl: {BROKEN_ENV_ID} (training iteration 1): 4/4 episodes ended in error" in err
    assert "taurl: error: stopping: 4 of 4 episodes (100%) of iteration 1 ended in error" in err
    assert "FileNotFoundError: tasks.jsonl is missing" in err and "in make_task" in err
    assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text()


def test_resume_refuses_extra_arguments(tmp_path: Path) -> None:
    from taurl.cli import main

    assert main(["train", "--resume", str(tmp_path), "iterations=3"]) == 2


EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_load_and_name_registered_envs(path: Path) -> None:
    import taurl.envs  # noqa: F401 - registers the built-in environments

    cfg = load_config(TrainConfig, path)
    assert cfg.rollout.env_id in gymnasium.registry


def test_default_config_is_the_main_example() -> None:
    """The README's main job runs `examples/grpo_calculator.yaml`; it is TrainConfig()."""
    path = Path(__file__).parents[1] / "examples" / "grpo_calculator.yaml"
    assert load_config(TrainConfig, path) == TrainConfig()


@pytest.mark.vllm
def test_sigterm_stops_the_trainer_and_its_vllm_engine_processes(tmp_path: Path) -> None:
    """`kill PID` on `taurl train` ends it with a resume hint and leaves no engine process behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    run_dir = tmp_path / "terminated"
    args = [
        "model=tiny-random", f"run_dir={run_dir}", "iterations=50", f"rollout.env_id={ENV_ID}",
        "rollout.num_tasks=2", "rollout.samples_per_task=2", "rollout.progress=false",
        "rollout.agent.sampling.max_tokens=8", "rollout.agent.max_turns=2", "eval_every=0",
        "tensorboard=false", "backend.kind=vllm",
    ]
    code = CLI_WITH_TEST_ENV
    proc = subprocess.Popen([sys.executable, "-c", code, "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not metrics.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert metrics.exists(), "the first iteration never finished"
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "expected vLLM's engine processes under the trainer"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert f"taurl train --resume {run_dir}" in err
    _, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:
        p.kill()
    assert alive == [], f"left running: {[p.pid for p in alive]}"
