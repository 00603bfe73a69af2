"""The training loop: rollout → learn → sync weights → evaluate → checkpoint.

One loop serves every preset (REINFORCE, PPO, GRPO, GRPO-OPD): the algorithm is
only the learner's config. Each iteration

1. samples ``rollout.num_tasks`` new tasks of the training split (task offset
   ``iteration × num_tasks``) and runs ``samples_per_task`` episodes of each through
   the inference backend (one group per task);
2. updates the policy with the learner (advantages = reward side, loss = trajectory side);
3. loads the new weights into the inference engine (``policy_version`` goes up);
4. every ``eval_every`` iterations, evaluates greedily on the held-out split;
5. writes a checkpoint atomically when one is due (``checkpoint_every``; by default
   as often as keeps checkpoints within 5% of the run's time; ``checkpoint_background``:
   from an in-memory copy, in a thread), and appends one line to
   ``metrics.jsonl``.

A run directory holds ``config.yaml`` (the config it was started with: a different
one is refused), ``metrics.jsonl``, ``samples.md`` (readable trajectories),
``checkpoints/iter-N`` and ``checkpoints/latest``, and TensorBoard events.
``taurl train --resume RUN_DIR`` restarts from the latest checkpoint; a run killed
at any moment loses at most the iterations since it (``checkpoint_every: 1``: the
iteration in progress and, in the background, the one being written).

``torchrun --nproc-per-node N -m taurl train CONFIG`` runs the learner data-parallel
(``learner.parallel``: ddp or fsdp2): rank 0 owns the inference engine, rollout,
evaluation, checkpoints, metrics and printing, and hands each batch to the other
ranks, which only run the learner (:func:`_follow`); every rank loads the checkpoint
on ``--resume``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from taurl.agents.backend import InferenceBackend, make_backend
from taurl.agents.loop import Agent
from taurl.errors import TaurlError
from taurl.learners import Learner, LearnerConfig, distributed
from taurl.models import resolve_model
from taurl.rollout.eval import EvalConfig, evaluate
from taurl.rollout.failures import env_failures
from taurl.rollout.metrics import batch_means
from taurl.rollout.runner import EnvFactory, RolloutResult, run_rollout
from taurl.run_dir import (
    CheckpointSchedule,
    CheckpointWriter,
    MetricsLog,
    RunDir,
    snapshot_checkpoint,
)
from taurl.train_config import TrainConfig
from taurl.types import Trajectory

T = TypeVar("T")


def sync_dtype(backend: InferenceBackend) -> torch.dtype:
    """The dtype weights are synced in: the engine's own (float32 when it does not say)."""
    dtype = getattr(backend, "weight_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


async def sync_weights(backend: InferenceBackend, learner: Learner) -> None:
    """Load the learner's policy into the engine, in the engine's dtype. The parameters go
    without a copy: ``update_weights`` copies what it keeps before the next update."""
    await backend.update_weights(learner.state_dict_for_sync(sync_dtype(backend), copy=False),
                                 learner.policy_version)


def _resolve_model_options(config: LearnerConfig) -> LearnerConfig:
    """``options.teacher_path`` / ``critic_path`` may name a built-in model, as ``model:`` does."""
    o = config.options
    paths = {name: str(resolve_model(getattr(o, name)))
             for name in ("teacher_path", "critic_path") if getattr(o, name)}
    if not paths:
        return config
    return dataclasses.replace(config, options=dataclasses.replace(o, **paths))


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The config a run was started with."""
    return RunDir(run_dir).read_config(TrainConfig)


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
    logger = MetricsLog(run, cfg.tensorboard)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    t_start = time.perf_counter()
    pending: asyncio.Task[tuple[RolloutResult, float]] | None = None  # next batch, sampled ahead
    writer: CheckpointWriter | None = None
    try:
        # The engine must sample with the learner's weights: a fresh engine already does at
        # iteration 0, a resumed or shared one does not.
        t0 = time.perf_counter()
        _lead("sync")
        await sync_weights(backend, learner)
        initial_sync_s = time.perf_counter() - t0
        agent = Agent(backend, tokenizer, cfg.rollout.agent)
        checkpoints = CheckpointSchedule(cfg.checkpoint_every, cfg.checkpoint_budget, start_iter)
        writer = CheckpointWriter(run, cfg.keep_checkpoints, on_done=checkpoints.saved)
        overlap = cfg.rollout.max_off_policy_steps > 0
        reported: set[str] = set()  # "rollout"/"eval" once its first error has been printed
        for it in range(start_iter, cfg.iterations):
            t_iter = t0 = time.perf_counter()
            result, rollout_s = await (pending or _rollout(cfg, agent, it, make_env))
            wait_s = time.perf_counter() - t0
            _check_errors(cfg, it, result.trajectories, reported)
            # Asynchronous: the next batch samples (with these weights, then the new ones as
            # they land between requests) while the learner trains on this one.
            pending = (asyncio.create_task(_rollout(cfg, agent, it + 1, make_env))
                       if overlap and it + 1 < cfg.iterations else None)
            metrics = await _learn(cfg, logger, backend, learner, it, result, overlap)
            metrics.update({"timing/rollout_s": rollout_s, "timing/rollout_wait_s": wait_s})
            if it == start_iter:
                metrics["timing/initial_sync_s"] = initial_sync_s
            elapsed_min = (time.perf_counter() - t_start) / 60
            last = it == cfg.iterations - 1 or (
                cfg.time_budget_min and elapsed_min >= cfg.time_budget_min
            )
            if last:  # the batch sampled ahead is not needed, and would slow the eval down
                await _drop(pending)
                pending = None
            if cfg.eval_every and cfg.eval_episodes and ((it + 1) % cfg.eval_every == 0 or last):
                t0 = time.perf_counter()
                metrics.update(await _evaluate(cfg, agent, make_env, reported))
                metrics["timing/eval_s"] = time.perf_counter() - t0
            if last or checkpoints.due(it, busy=writer.busy):
                t0 = time.perf_counter()
                _lead("save")
                snap = await _maybe_thread(overlap, snapshot_checkpoint, it, learner, model_path,
                                           cfg.checkpoint_background)  # in line: no copies
                await _maybe_thread(overlap or writer.busy, writer.start, snap, t0)
                if last or not cfg.checkpoint_background:
                    await _maybe_thread(overlap, writer.wait)  # on disk before going on
                metrics["timing/checkpoint_s"] = time.perf_counter() - t0
            if writer.last_write_s is not None:  # a write ended (in the background: since the last line)
                metrics["timing/checkpoint_write_s"], writer.last_write_s = writer.last_write_s, None
            metrics["timing/elapsed_min"] = elapsed_min
            metrics["timing/iteration_s"] = time.perf_counter() - t_iter
            logger.log(it, metrics)
            _print_line(it, cfg.iterations, metrics)
            if last:
                break
        _lead("stop")
    finally:
        await _drop(pending)  # a run that stops early drops the batch sampled ahead
        if writer is not None:
            writer.wait()  # a checkpoint being written is finished, even when the run failed
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


async def _rollout(
    cfg: TrainConfig, agent: Agent, it: int, make_env: EnvFactory | None
) -> tuple[RolloutResult, float]:
    """Iteration ``it``'s training episodes (new tasks: offset ``it × num_tasks``) and seconds."""
    t0 = time.perf_counter()
    rollout_cfg = dataclasses.replace(
        cfg.rollout, seed=cfg.seed, task_offset=it * cfg.rollout.num_tasks, split="train"
    )
    result = await run_rollout(agent, rollout_cfg, make_env=make_env)
    return result, time.perf_counter() - t0


def _check_errors(cfg: TrainConfig, it: int, trajs: list[Trajectory], reported: set[str]) -> None:
    """Print the run's first rollout error to stderr; stop past ``cfg.max_error_rate``.

    Episodes that error are left out of the update, so a broken environment would
    otherwise train on what little remains, or on nothing, while the run looks healthy.
    """
    failures = env_failures(trajs)
    if not failures:
        return
    failure = failures[0]  # a training rollout runs one environment
    if "rollout" not in reported:
        reported.add("rollout")
        print(failure.format(f"training iteration {it + 1}"), file=sys.stderr, flush=True)
    rate = failure.errors / len(trajs)
    if rate > cfg.max_error_rate:
        raise TaurlError(
            f"stopping: {failure.errors} of {len(trajs)} episodes ({rate:.0%}) of iteration "
            f"{it + 1} ended in error, more than max_error_rate={cfg.max_error_rate}. The first: "
            f"{failure.first_error}\n{failure.traceback}\nFix the environment "
            f"{failure.env_id!r}, or raise max_error_rate (1.0 never stops)"
        )


async def _learn(
    cfg: TrainConfig, log: MetricsLog, backend: InferenceBackend, learner: Learner, it: int,
    result: RolloutResult, overlap: bool,
) -> dict[str, float]:
    """Update on one rollout's episodes, then sync the new weights into the engine.

    With ``overlap`` (asynchronous rollout) the update runs in a thread, so the next
    batch's episodes keep sampling on this event loop meanwhile; episodes more than
    ``max_off_policy_steps`` optimizer steps old are dropped (truncated importance
    weights against the sampler's log-probs correct the rest).
    """
    trajs = result.trajectories
    metrics = batch_means(trajs)
    metrics["rollout/tokens_per_s"] = result.summary.tokens_per_s
    batch = [t for t in trajs if t.termination != "error"]
    staleness = [learner.policy_version - t.policy_version for t in batch]
    if overlap:
        k = cfg.rollout.max_off_policy_steps
        batch = [t for t, s in zip(batch, staleness, strict=True) if s <= k]
        metrics["rollout/stale_dropped"] = float(len(staleness) - len(batch))
    metrics["rollout/staleness_max"] = float(max(staleness, default=0))
    metrics["rollout/staleness_mean"] = sum(staleness) / max(len(staleness), 1)
    t1 = time.perf_counter()
    _lead("update", batch)
    metrics.update(await _maybe_thread(overlap, learner.update, batch))
    t2 = time.perf_counter()
    await sync_weights(backend, learner)
    t3 = time.perf_counter()
    metrics.update({
        "timing/update_s": t2 - t1, "timing/sync_s": t3 - t2,
        "policy_version": float(learner.policy_version),
    })
    if cfg.log_samples:
        log.samples(it, trajs[: cfg.log_samples])
    return metrics


async def _drop(task: asyncio.Task[tuple[RolloutResult, float]] | None) -> None:
    """Cancel a rollout sampled ahead and wait for it to unwind (None: nothing to do)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def _maybe_thread(in_thread: bool, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)``, in a worker thread when ``in_thread`` (the event loop keeps running)."""
    if in_thread:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def _evaluate(
    cfg: TrainConfig, agent: Agent, make_env: EnvFactory | None = None,
    reported: set[str] | None = None,
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
    failures = env_failures(res.trajectories)
    if failures and reported is not None and "eval" not in reported:
        reported.add("eval")
        print(failures[0].format("held-out evaluation"), file=sys.stderr, flush=True)
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
