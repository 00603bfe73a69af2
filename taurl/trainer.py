"""The training loop: rollout → learn → sync weights → evaluate → checkpoint.

One loop serves every preset (REINFORCE, PPO, GRPO, GRPO-OPD): the algorithm is
only the learner's config. Each iteration

1. samples ``rollout.num_tasks`` new tasks of the training split (task offset
   ``iteration × num_tasks``) and runs ``samples_per_task`` episodes of each through
   the inference backend (one group per task);
2. updates the policy with the learner (advantages = reward side, loss = trajectory side);
3. loads the new weights into the inference engine (``policy_version`` goes up);
4. every ``eval_every`` iterations, evaluates greedily on the held-out split;
5. writes a checkpoint atomically and appends one line to ``metrics.jsonl``.

A run directory holds ``config.yaml`` (the config it was started with: a different
one is refused), ``metrics.jsonl``, ``samples.md`` (readable trajectories),
``checkpoints/iter-N`` and ``checkpoints/latest``, and TensorBoard events.
``taurl train --resume RUN_DIR`` restarts from the latest checkpoint; a run killed
at any moment loses at most the iteration in progress.

``torchrun --nproc-per-node N -m taurl train CONFIG`` runs the learner data-parallel
(``learner.parallel``: ddp or fsdp2): rank 0 owns the inference engine, rollout,
evaluation, checkpoints, metrics and printing, and hands each batch to the other
ranks, which only run the learner (:func:`_follow`); every rank loads the checkpoint
on ``--resume``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from taurl.agents.backend import InferenceBackend, make_backend
from taurl.agents.config import BackendConfig, RayConfig
from taurl.agents.loop import Agent, AgentConfig
from taurl.config import config_from_dict, config_to_dict, dump_config
from taurl.errors import ConfigError, TaurlError
from taurl.learners import AlgorithmOptions, Learner, LearnerConfig, distributed
from taurl.models import resolve_model
from taurl.rollout.eval import EvalConfig, evaluate
from taurl.rollout.runner import EnvFactory, RolloutConfig, run_rollout
from taurl.types import TERMINATIONS, SamplingParams, Trajectory

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def _default_rollout() -> RolloutConfig:
    return RolloutConfig(
        env_id="taurl/Calculator-v0", num_tasks=4, samples_per_task=8, max_in_flight=64,
        agent=AgentConfig(max_turns=3, sampling=SamplingParams(max_tokens=96, temperature=1.0)),
    )


def sync_dtype(backend: InferenceBackend) -> torch.dtype:
    """The dtype weights are synced in: the engine's own (float32 when it does not say)."""
    dtype = getattr(backend, "weight_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


@dataclass
class TrainConfig:
    """A training run. Every field can be set in YAML or as ``key=value`` on the command line."""

    # policy model: built-in name (smollm2-135m, tiny-random), HF folder, or cached hub id
    model: str = "smollm2-135m"
    # where config, metrics, samples and checkpoints go
    run_dir: str = "runs/grpo-calculator"
    # training iterations (rollout + update + sync)
    iterations: int = 30
    # stop early after this many minutes of wall-clock time (0 = no limit)
    time_budget_min: float = 30.0
    # base seed of tasks, sampling and the learner
    seed: int = 0
    # training episodes: env, tasks per iteration (N), group size (G), agent limits and sampling
    rollout: RolloutConfig = field(default_factory=_default_rollout)
    # the algorithm and its optimiser (learner.algorithm: reinforce | ppo | grpo | grpo_opd | ...)
    learner: LearnerConfig = field(
        default_factory=lambda: LearnerConfig(
            lr=5e-6, micro_batch_tokens=2048, options=AlgorithmOptions(kl_coef=0.0)
        )
    )
    # the inference engine: vllm (in-process, default), server, or hf
    backend: BackendConfig = field(default_factory=BackendConfig)
    # Ray scale-out (ray.address=local|auto|ray://...): engines and env workers as actors; off by default
    ray: RayConfig = field(default_factory=RayConfig)
    # evaluate on the held-out split every this many iterations (0 = never; also at the end)
    eval_every: int = 4
    # held-out tasks per evaluation (greedy, one sample each)
    eval_episodes: int = 32
    # write a checkpoint every this many iterations (the last iteration is always saved)
    checkpoint_every: int = 1
    # checkpoints kept on disk (the newest ones)
    keep_checkpoints: int = 2
    # trajectories per iteration appended to samples.md as text
    log_samples: int = 2
    # also write TensorBoard event files (needs the tensorboard package)
    tensorboard: bool = True

    def __post_init__(self) -> None:
        for name in ("iterations", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_episodes", "log_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.time_budget_min < 0:
            raise ConfigError(f"time_budget_min must be >= 0 (0 = none), got {self.time_budget_min}")
        if self.rollout.split != "train":
            raise ConfigError(
                f"rollout.split is {self.rollout.split!r}; training samples the 'train' split "
                "(held-out tasks are for evaluation)"
            )
        if self.learner.seed == 0 and self.seed:
            self.learner.seed = self.seed


# -- the run directory --------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunDir:
    """The files of one run; writes are atomic (temp name, then rename)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / CHECKPOINTS

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def init(self, cfg: TrainConfig) -> None:
        """Create the run directory for ``cfg``; refuse one that belongs to another run."""
        if self.config_path.exists():
            old = load_run_config(self.path)
            if config_to_dict(old) != config_to_dict(cfg):
                diff = _config_diff(config_to_dict(old), config_to_dict(cfg))
                raise ConfigError(
                    f"{self.path} already holds a run with a different config ({diff}); "
                    "pick another run_dir, or `taurl train --resume` it with its own config"
                )
            if self.latest_checkpoint() is not None:
                raise ConfigError(
                    f"{self.path} already holds checkpoints of this config; continue it with "
                    f"`taurl train --resume {self.path}`, or pick another run_dir"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        tmp = self.path / ".config.yaml.tmp"
        dump_config(cfg, tmp)
        os.replace(tmp, self.config_path)

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints / LATEST
        if not pointer.is_file():
            return None
        ckpt = self.checkpoints / pointer.read_text().strip()
        return ckpt if (ckpt / "trainer.json").is_file() else None

    def save_checkpoint(
        self, iteration: int, learner: Learner, keep: int, model_path: Path
    ) -> Path:
        """Write ``checkpoints/iter-N`` under a temp name, rename it, then move ``latest``.

        ``iter-N/policy`` is a plain Hugging Face folder of the policy (what ``taurl eval
        --model`` and vLLM load); ``iter-N/learner`` holds what resuming needs.
        """
        name = f"iter-{iteration:06d}"
        tmp = self.checkpoints / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        learner.save(tmp / "learner")
        export_policy(learner, model_path, tmp / "policy")
        rng = {"python": random.getstate(), "numpy": np.random.get_state()}
        torch.save(rng, tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps({"iteration": iteration}))
        final = self.checkpoints / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write(self.checkpoints / LATEST, name)
        done = sorted(p for p in self.checkpoints.glob("iter-*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def truncate_metrics(self, last_iteration: int) -> None:
        """Drop metrics lines past ``last_iteration`` (written by an iteration that was lost)."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", -1) <= last_iteration]
        _atomic_write(path, "".join(f"{line}\n" for line in keep))


def _resolve_model_options(config: LearnerConfig) -> LearnerConfig:
    """``options.teacher_path`` / ``critic_path`` may name a built-in model, as ``model:`` does."""
    o = config.options
    paths = {name: str(resolve_model(getattr(o, name)))
             for name in ("teacher_path", "critic_path") if getattr(o, name)}
    if not paths:
        return config
    return dataclasses.replace(config, options=dataclasses.replace(o, **paths))


def export_policy(learner: Learner, model_path: Path, out: Path) -> None:
    """Write the learner's policy as a Hugging Face folder (config, tokenizer, safetensors)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in model_path.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "taurl-model.json":
            shutil.copy2(f, out / f.name)
    # float32, and said so in config.json: RL updates at small learning rates are often
    # below bf16's resolution, so a bf16 export can round the learned change away.
    state = {k: v.contiguous() for k, v in learner.state_dict_for_sync(torch.float32).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _config_diff(a: dict[str, object], b: dict[str, object], prefix: str = "") -> str:
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _config_diff(va, vb, f"{prefix}{k}.")
            if d:
                return d
        elif va != vb:
            return f"{prefix}{k}: {va!r} there, {vb!r} now"
    return ""


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The config a run was started with."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; is {run_dir} a run directory of `taurl train`?")
    return config_from_dict(TrainConfig, yaml.safe_load(path.read_text()))


# -- metrics ------------------------------------------------------------------------


def rollout_metrics(trajs: list[Trajectory], prefix: str = "rollout") -> dict[str, float]:
    """Means over a batch of episodes: return, success, turns, tool calls, lengths, terminations."""
    n = max(len(trajs), 1)
    out = {
        f"{prefix}/tool_calls": sum(int(t.info.get("tool_calls", 0) or 0) for t in trajs) / n,  # type: ignore[arg-type]
        f"{prefix}/tool_errors": sum(int(t.info.get("tool_errors", 0) or 0) for t in trajs) / n,  # type: ignore[arg-type]
        f"{prefix}/return": sum(t.episode_return for t in trajs) / n,
        f"{prefix}/success": sum(bool(t.success) for t in trajs) / n,
        f"{prefix}/turns": sum(t.num_turns for t in trajs) / n,
        f"{prefix}/sampled_tokens": sum(t.num_sampled_tokens for t in trajs) / n,
        f"{prefix}/episode_tokens": sum(len(t.token_ids) for t in trajs) / n,
    }
    for reason in TERMINATIONS:
        out[f"{prefix}/termination/{reason}"] = sum(t.termination == reason for t in trajs) / n
    stops = [s for t in trajs for s in t.info.get("finish_reasons", []) or []]  # type: ignore[union-attr]
    if stops:
        out[f"{prefix}/stop/length"] = sum(s == "length" for s in stops) / len(stops)
    return out


def _sample_text(t: Trajectory) -> str:
    lines = [f"### {t.env_id} {t.task_id} · return {t.episode_return:.2f} · {t.termination}"]
    for m in t.messages:
        lines.append(f"**{m.get('role')}**: {m.get('content')}")
    return "\n\n".join(lines) + "\n\n"


class _Logger:
    def __init__(self, run: RunDir, tensorboard: bool) -> None:
        self.path = run.path / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run.path / "tb"))
            except ImportError:
                print("taurl: tensorboard is not installed; metrics go to metrics.jsonl only")

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        row = {"iteration": iteration, **metrics}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, iteration)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# -- the loop -----------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


async def train_async(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    backend: InferenceBackend | None = None,
) -> Path:
    """Run (or resume) a training run; return its run directory.

    ``backend`` lets a caller share an already running engine (it must serve the
    same model); by default the trainer starts the one ``cfg.backend`` names and
    closes it at the end.
    """
    run = RunDir(cfg.run_dir)
    distributed.init_process_group()  # under torchrun; nothing for a single process
    ckpt = distributed.on_main(lambda: _open_run(run, cfg, resume))
    main = distributed.is_main()  # rank 0 owns the engine, rollout, eval and the run dir
    start_iter = 0
    model_path = resolve_model(cfg.model)
    _seed_everything(cfg.seed)
    learner = Learner(_resolve_model_options(cfg.learner), model_path)
    if ckpt is not None:
        learner.load(ckpt / "learner")
        rng = torch.load(ckpt / "rng.pt", weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        start_iter = json.loads((ckpt / "trainer.json").read_text())["iteration"] + 1
        if main:
            run.truncate_metrics(start_iter - 1)
            print(f"taurl: resuming {run.path} at iteration {start_iter} from {ckpt.name}")
    elif resume and main:
        print(f"taurl: {run.path} has no checkpoint yet; starting it from iteration 0")
        run.truncate_metrics(-1)
    if not main:
        try:
            _follow(learner, run)
        finally:
            distributed.shutdown()
        return run.path
    own_backend = backend is None
    ray_rollout = None
    with distributed.without_torchrun_env():  # the engine's own processes are no ranks
        if cfg.ray.enabled:  # Ray (engine and env worker actors) is imported only when asked for
            from taurl.rollout.ray_envs import RayRollout

            ray_rollout = RayRollout(cfg.ray)
        if backend is None and ray_rollout is not None:
            backend = ray_rollout.make_backend(cfg.backend.kind, model_path, cfg.backend.options)
        elif backend is None:
            backend = make_backend(cfg.backend.kind, model_path, **cfg.backend.options)
    make_env = ray_rollout.make_env if ray_rollout is not None else None
    logger = _Logger(run, cfg.tensorboard)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    t_start = time.perf_counter()
    try:
        # The engine must sample with the learner's weights: a fresh engine already does at
        # iteration 0, a resumed or shared one does not.
        t0 = time.perf_counter()
        _lead("sync")
        await backend.update_weights(learner.state_dict_for_sync(sync_dtype(backend)), learner.policy_version)
        initial_sync_s = time.perf_counter() - t0
        agent = Agent(backend, tokenizer, cfg.rollout.agent)
        for it in range(start_iter, cfg.iterations):
            metrics = await _iteration(cfg, run, agent, backend, learner, it, make_env)
            if it == start_iter:
                metrics["timing/initial_sync_s"] = initial_sync_s
            elapsed_min = (time.perf_counter() - t_start) / 60
            last = it == cfg.iterations - 1 or (
                cfg.time_budget_min and elapsed_min >= cfg.time_budget_min
            )
            if cfg.eval_every and cfg.eval_episodes and ((it + 1) % cfg.eval_every == 0 or last):
                t0 = time.perf_counter()
                metrics.update(await _evaluate(cfg, agent, make_env))
                metrics["timing/eval_s"] = time.perf_counter() - t0
            if (it + 1) % cfg.checkpoint_every == 0 or last:
                t0 = time.perf_counter()
                _lead("save")
                run.save_checkpoint(it, learner, cfg.keep_checkpoints, model_path)
                metrics["timing/checkpoint_s"] = time.perf_counter() - t0
            metrics["timing/elapsed_min"] = elapsed_min
            logger.log(it, metrics)
            _print_line(it, cfg.iterations, metrics)
            if last:
                break
        _lead("stop")
    finally:
        logger.close()
        if own_backend:
            await backend.close()
        if ray_rollout is not None:
            ray_rollout.close()
        distributed.shutdown()
    return run.path


def _open_run(run: RunDir, cfg: TrainConfig, resume: bool) -> Path | None:
    """Create the run directory of a new run, or find the checkpoint to resume (or None)."""
    if resume:
        return run.latest_checkpoint()
    run.init(cfg)
    return None


# Under torchrun, ranks > 0 run no engine: they wait for rank 0 to announce each learner
# call it makes (update, weight sync, checkpoint) and make the same one, so that the
# learner's collectives (DDP's gradient all-reduce, FSDP2's gathers) meet in step.


def _lead(command: str, trajectories: list[Trajectory] | None = None) -> None:
    """Rank 0: tell the other ranks which learner call comes next (no-op alone)."""
    if distributed.is_distributed():
        distributed.broadcast_object((command, trajectories))


def _follow(learner: Learner, run: RunDir) -> None:
    """Ranks > 0: make the learner calls rank 0 announces, until it says ``stop``.

    ``update`` is followed by rank 0's weight sync into its engine, ``save`` (a
    checkpoint) by the export of its policy folder: both read the full weights.
    """
    while True:
        command, trajectories = distributed.broadcast_object(None)
        if command == "stop":
            return
        if command == "update":
            learner.update(trajectories)
        elif command == "save":
            learner.save(run.checkpoints)  # writes nothing off rank 0
        learner.state_dict_for_sync()


async def _iteration(
    cfg: TrainConfig, run: RunDir, agent: Agent, backend: InferenceBackend, learner: Learner,
    it: int, make_env: EnvFactory | None = None,
) -> dict[str, float]:
    t0 = time.perf_counter()
    rollout_cfg = dataclasses.replace(
        cfg.rollout, seed=cfg.seed, task_offset=it * cfg.rollout.num_tasks, split="train"
    )
    result = await run_rollout(agent, rollout_cfg, make_env=make_env)
    trajs = result.trajectories
    t1 = time.perf_counter()
    metrics = rollout_metrics(trajs)
    metrics["rollout/tokens_per_s"] = result.summary.tokens_per_s
    batch = [t for t in trajs if t.termination != "error"]
    _lead("update", batch)
    metrics.update(learner.update(batch))
    t2 = time.perf_counter()
    await backend.update_weights(
        learner.state_dict_for_sync(sync_dtype(backend)), learner.policy_version
    )
    t3 = time.perf_counter()
    metrics.update({
        "timing/rollout_s": t1 - t0, "timing/update_s": t2 - t1, "timing/sync_s": t3 - t2,
        "policy_version": float(learner.policy_version),
    })
    if cfg.log_samples:
        with open(run.path / "samples.md", "a", encoding="utf-8") as f:
            f.write(f"## iteration {it}\n\n")
            f.writelines(_sample_text(t) for t in trajs[: cfg.log_samples])
    return metrics


async def _evaluate(
    cfg: TrainConfig, agent: Agent, make_env: EnvFactory | None = None
) -> dict[str, float]:
    eval_cfg = EvalConfig(
        envs=[cfg.rollout.env_id], split="heldout", episodes=cfg.eval_episodes, samples=1,
        seed=cfg.seed, env_kwargs={cfg.rollout.env_id: dict(cfg.rollout.env_kwargs)},
        progress=False, max_in_flight=cfg.rollout.max_in_flight,
        agent=dataclasses.replace(
            cfg.rollout.agent, sampling=dataclasses.replace(cfg.rollout.agent.sampling, temperature=0.0)
        ),
    )
    results = await evaluate(agent, eval_cfg, make_env=make_env)
    res = results[cfg.rollout.env_id]
    return {"eval/success": res.metrics.success_rate, "eval/return": res.metrics.mean_return}


def _print_line(it: int, total: int, m: dict[str, float]) -> None:
    parts = [f"iter {it + 1}/{total}", f"return {m.get('rollout/return', 0):.3f}",
             f"success {m.get('rollout/success', 0):.2f}"]
    if "eval/success" in m:
        parts.append(f"held-out success {m['eval/success']:.2f}")
    parts.append(
        f"rollout {m.get('timing/rollout_s', 0):.1f}s update {m.get('timing/update_s', 0):.1f}s "
        f"sync {m.get('timing/sync_s', 0):.2f}s"
    )
    print(" | ".join(parts), flush=True)


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Synchronous entry point of :func:`train_async`."""
    try:
        return asyncio.run(train_async(cfg, resume=resume))
    except KeyboardInterrupt as e:
        raise TaurlError(
            f"interrupted; continue with `taurl train --resume {cfg.run_dir}`"
        ) from e
