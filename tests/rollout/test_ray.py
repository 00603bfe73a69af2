"""Ray scale-out: engine actors, env workers, weight broadcast, actor kills, a training run.

One local Ray cluster and one :class:`RayBackend` with two vLLM engine actors on the
tiny model serve the whole module (each engine takes 20-60 s to start on 2 cores).
The tests run in file order: the kill tests leave a replaced engine behind, the
training run leaves trained weights.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from taurl.agents.config import RayConfig
from taurl.config import load_config
from taurl.errors import ConfigError
from taurl.types import SamplingParams

if TYPE_CHECKING:
    from types import ModuleType

    from taurl.agents.ray_backend import RayBackend
    from taurl.rollout.runner import RolloutConfig, RolloutResult

ENGINE_OPTIONS = {"dtype": "float32", "max_model_len": 1024, "seed": 0}
CONFIG = RayConfig(
    address="local", num_engines=2, env_workers=2, max_restarts=2,
    env_vars={"VLLM_CPU_KVCACHE_SPACE": "1"},  # GiB of KV cache per engine: vLLM's smallest
)  # fmt: skip


# -- without a cluster ---------------------------------------------------------------


def test_without_the_option_nothing_imports_ray() -> None:
    code = (
        "import sys, taurl, taurl.trainer, taurl.cli\n"
        "from taurl.config import load_config\n"
        "from taurl.trainer import TrainConfig\n"
        "from taurl.rollout.commands import RolloutCommand, EvalCommand\n"
        "load_config(TrainConfig, 'examples/grpo_calculator.yaml', ['learner.lr=1e-5'])\n"
        "load_config(RolloutCommand, None, ['rollout.num_tasks=2'])\n"
        "load_config(EvalCommand, None, [])\n"
        "taurl.cli.build_parser().parse_args(['train', 'examples/grpo_calculator.yaml'])\n"
        "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not loaded, loaded\n"
    )
    root = Path(__file__).resolve().parents[2]  # the repository root
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("ray.address=localhost", "ray.address must be"),
        ("ray.num_engines=0", "ray.num_engines must be >= 1"),
        ("ray.env_workers=-1", "ray.env_workers must be >= 0"),
        ("ray.cpus_per_engine=-0.5", "ray.cpus_per_engine must be >= 0"),
        ("ray.gpus_per_engine=-1", "ray.gpus_per_engine must be >= 0 or None"),
        ("ray.start_timeout_s=0", "ray.start_timeout_s must be > 0"),
        ("ray.max_restarts=-1", "ray.max_restarts must be >= 0"),
        ("ray.num_cpus=4", "ray.num_cpus sizes a cluster this process starts"),
        ("ray.num_engnes=2", "did you mean 'num_engines'"),
    ],
)
def test_config_errors(override: str, needle: str) -> None:
    from taurl.trainer import TrainConfig

    extra = ["ray.address=auto"] if override.startswith("ray.num_cpus") else []
    with pytest.raises(ConfigError, match=needle):
        load_config(TrainConfig, None, [*extra, override])


def test_config_accepts_addresses() -> None:
    for address in ("", "local", "auto", "ray://head:10001", "10.0.0.1:6379"):
        assert RayConfig(address=address).enabled == bool(address)
    assert RayConfig(address="local", num_engines=2, env_workers=3).cpus_reserved() == 5


def test_packed_state_dict_round_trips_every_dtype_and_shape() -> None:
    import torch

    from taurl.agents.ray_engine import pack_state_dict, unpack_state_dict

    state = {
        "bf16": torch.randn(3, 4).bfloat16(), "f32": torch.randn(5), "scalar": torch.tensor(2.0),
        "empty": torch.zeros(0, 3), "strided": torch.randn(4, 6)[:, :3], "i64": torch.arange(7),
    }  # fmt: skip
    state["tied"] = state["bf16"]
    back = unpack_state_dict(pack_state_dict(state))
    assert list(back) == list(state)
    for name, t in state.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t), name


# -- on a local cluster --------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[ModuleType]:
    ray = pytest.importorskip("ray")
    ray.init(
        address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
        object_store_memory=1 << 30,
    )  # fmt: skip
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_backend(ray_cluster: ModuleType, tiny_model_path: Path) -> Iterator[RayBackend]:
    from taurl.agents.ray_backend import RayBackend

    backend = RayBackend(tiny_model_path, CONFIG, kind="vllm", options=ENGINE_OPTIONS)
    try:
        yield backend
    finally:
        backend.close_sync()


def _rollout_config(**over: object) -> RolloutConfig:
    from taurl.agents.loop import AgentConfig
    from taurl.rollout.runner import RolloutConfig

    agent = AgentConfig(max_turns=3, sampling=SamplingParams(max_tokens=24, temperature=1.0))
    fields: dict[str, object] = {
        "env_id": "taurl/GuessNumber-v0", "num_tasks": 5, "samples_per_task": 2,
        "max_in_flight": 10, "seed": 3, "progress": False, "agent": agent,
    }  # fmt: skip
    fields.update(over)
    return RolloutConfig(**fields)  # type: ignore[arg-type]


def _rollout(backend: RayBackend, tiny_model_path: Path, **kwargs: object) -> RolloutResult:
    from transformers import AutoTokenizer

    from taurl.agents.loop import Agent
    from taurl.rollout.runner import run_rollout

    config = _rollout_config()
    agent = Agent(backend, AutoTokenizer.from_pretrained(tiny_model_path), config.agent)
    return asyncio.run(run_rollout(agent, config, **kwargs))  # type: ignore[arg-type]


def _wait_healthy(backend: RayBackend, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(s["healthy"] for s in backend.engine_status()):
        assert time.monotonic() < deadline, backend.engine_status()
        time.sleep(0.5)


def _check_exactly_once(result: RolloutResult, streamed: int, reference: RolloutResult) -> None:
    assert streamed == len(result.trajectories) == len(reference.trajectories) == 10
    assert result.summary.errors == 0, [t.info.get("error") for t in result.trajectories]
    # the same seeds give the same episodes: none lost, none mixed up, none counted twice
    for got, want in zip(result.trajectories, reference.trajectories, strict=True):
        assert got.group_id == want.group_id and got.seed == want.seed
        assert got.token_ids == want.token_ids


def _session_per_engine(backend: RayBackend, prefix: str) -> dict[int, str]:
    """A new session on each engine: two at once go to the two idle engines."""
    sessions = [f"{prefix}-0", f"{prefix}-1"]
    sampling = SamplingParams(max_tokens=1, seed=0)

    async def run() -> None:
        await asyncio.gather(*(backend.generate([1], sampling, session_id=s) for s in sessions))

    asyncio.run(run())
    by_engine = {backend.session_engine(s): s for s in sessions}
    assert sorted(by_engine) == [0, 1], by_engine  # type: ignore[type-var]
    return by_engine  # type: ignore[return-value]


def _sample_each(backend: RayBackend, by_engine: dict[int, str]) -> list[list[int]]:
    sampling = SamplingParams(max_tokens=12, seed=11)

    async def run() -> list[list[int]]:
        gens = [
            await backend.generate([5, 6, 7], sampling, session_id=by_engine[i]) for i in (0, 1)
        ]
        return [g.token_ids for g in gens]

    return asyncio.run(run())


@pytest.fixture(scope="module")
def reference(ray_backend: RayBackend, tiny_model_path: Path) -> RolloutResult:
    """The rollout every kill test repeats, run once without faults."""
    return _rollout(ray_backend, tiny_model_path)


@pytest.mark.slow
def test_routing_keeps_sessions_and_spreads_by_outstanding_requests(
    ray_backend: RayBackend,
) -> None:
    sampling = SamplingParams(max_tokens=16, seed=7)

    async def burst(sessions: list[str], prompt: list[int]) -> list[list[int]]:
        gens = await asyncio.gather(
            *(ray_backend.generate(prompt, sampling, session_id=s) for s in sessions)
        )
        return [g.token_ids for g in gens]

    sessions = [f"route-{k}" for k in range(8)]
    first = asyncio.run(burst(sessions, [1, 2, 3, 4]))
    engines = [ray_backend.session_engine(s) for s in sessions]
    assert sorted(engines) == [0, 0, 0, 0, 1, 1, 1, 1]  # least outstanding: an even spread
    assert all(t == first[0] for t in first)  # same weights and seed on both engines

    # Later turns stay on the episode's engine even when the other one is idle.
    pinned = sessions[0]
    again = asyncio.run(burst([pinned] * 6, [1, 2, 3, 4]))
    assert ray_backend.session_engine(pinned) == engines[0]
    assert again == [first[0]] * 6
    assert ray_backend.stats["rerouted"] == 0


@pytest.mark.slow
def test_weight_update_reaches_every_engine(ray_backend: RayBackend, tiny_model_path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(tiny_model_path / "model.safetensors"))
    by_engine = _session_per_engine(ray_backend, "weights")
    before = _sample_each(ray_backend, by_engine)
    assert before[0] == before[1]
    flipped = {k: -v for k, v in state.items()}
    asyncio.run(ray_backend.update_weights(flipped, version=1))
    assert ray_backend.policy_version == 1
    after = _sample_each(ray_backend, by_engine)
    assert after[0] == after[1] != before[0]  # both engines sample with the new weights
    asyncio.run(ray_backend.update_weights(state, version=0))
    assert _sample_each(ray_backend, by_engine) == before


@pytest.mark.slow
def test_killed_engine_actor_is_replaced_and_no_episode_is_lost_or_doubled(
    ray_backend: RayBackend, ray_cluster: ModuleType, reference: RolloutResult,
    tiny_model_path: Path,
) -> None:  # fmt: skip
    assert reference.summary.errors == 0 and reference.summary.episodes == 10
    victim = ray_backend.engine_handles[0]
    dead_pid = ray_backend.engine_status()[0]["pid"]
    done: list[str] = []
    retries_before = ray_backend.stats["retries"]

    def on_trajectory(traj: object) -> None:
        done.append("x")
        if len(done) == 2:  # mid-rollout: the other episodes are running
            ray_cluster.kill(victim)

    result = _rollout(ray_backend, tiny_model_path, on_trajectory=on_trajectory)
    _check_exactly_once(result, len(done), reference)
    assert ray_backend.restarts == 1
    assert ray_backend.stats["retries"] > retries_before  # the kill hit requests in flight
    _wait_healthy(ray_backend)
    status = ray_backend.engine_status()
    assert status[0]["restarts"] == 1 and status[0]["pid"] != dead_pid
    # the replacement samples like its sibling: it was loaded with the latest weights
    gens = _sample_each(ray_backend, _session_per_engine(ray_backend, "replaced"))
    assert gens[0] == gens[1]


@pytest.mark.slow
def test_killed_env_worker_is_replaced_and_its_episodes_rerun(
    ray_backend: RayBackend, ray_cluster: ModuleType, reference: RolloutResult,
    tiny_model_path: Path,
) -> None:  # fmt: skip
    from taurl.rollout.ray_envs import RayEnvPool

    pool = RayEnvPool(CONFIG)
    try:
        victim = pool.worker_handles[0]
        done: list[str] = []

        def on_trajectory(traj: object) -> None:
            done.append("x")
            if len(done) == 1:
                ray_cluster.kill(victim)

        result = _rollout(
            ray_backend, tiny_model_path, on_trajectory=on_trajectory, make_env=pool.make
        )
        _check_exactly_once(result, len(done), reference)
        assert pool.stats["restarts"] == 1
        rerun = [t for t in result.trajectories if t.info.get("env_restarts")]
        assert rerun, "the kill hit no episode in progress"
    finally:
        pool.close()


@pytest.mark.slow
def test_two_training_iterations_through_ray(
    ray_backend: RayBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taurl import trainer
    from taurl.trainer import TrainConfig, train_async

    seen: list[list[int]] = []
    run_rollout = trainer.run_rollout

    async def recording(*args: object, **kwargs: object) -> RolloutResult:
        assert kwargs.get("make_env") is not None  # environments run in the Ray workers
        out = await run_rollout(*args, **kwargs)  # type: ignore[arg-type]
        seen.append(sorted({t.policy_version for t in out.trajectories}))
        return out

    monkeypatch.setattr(trainer, "run_rollout", recording)
    overrides = {
        "model": "tiny-random", "run_dir": str(tmp_path / "run"), "iterations": "2",
        "rollout.env_id": "taurl/Calculator-v0", "rollout.num_tasks": "2",
        "rollout.samples_per_task": "2", "rollout.progress": "false",
        "rollout.agent.max_turns": "2", "rollout.agent.sampling.max_tokens": "12",
        "learner.algorithm": "grpo", "learner.lr": "1e-3", "eval_every": "2",
        "eval_episodes": "2", "tensorboard": "false",
        "ray.address": "local", "ray.num_engines": "2", "ray.env_workers": "1",
    }  # fmt: skip
    cfg = load_config(TrainConfig, None, [f"{k}={v}" for k, v in overrides.items()])
    run = asyncio.run(train_async(cfg, backend=ray_backend))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[0]["rollout/termination/error"] == 0.0 and "eval/success" in rows[1]
    # each iteration samples with the weights of the update before it
    assert seen[0] == [0] and seen[1] == [int(rows[0]["policy_version"])] and seen[1] != [0]
    assert ray_backend.policy_version == int(rows[1]["policy_version"])
    assert (run / "checkpoints" / "latest").is_file()
