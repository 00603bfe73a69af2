"""The files of one training run: config, checkpoints (and when to write them), metrics, samples.

::

    RUN_DIR/config.yaml             the config the run was started with
    RUN_DIR/metrics.jsonl           one JSON line per iteration
    RUN_DIR/samples.md              readable trajectories
    RUN_DIR/tb/                     TensorBoard events (when asked for)
    RUN_DIR/checkpoints/iter-N/     learner/ (resume), policy/ (a Hugging Face folder)
    RUN_DIR/checkpoints/latest      the name of the newest complete checkpoint

Every write is atomic (a temporary name, then a rename), so a run killed at any
moment leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
import yaml

from taurl.config import config_from_dict, config_to_dict, dump_config
from taurl.errors import ConfigError
from taurl.types import Trajectory

if TYPE_CHECKING:
    from taurl.learners import Learner
    from taurl.learners.checkpoint import Snapshot as LearnerSnapshot

C = TypeVar("C")

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def newest_policy(model: str) -> str:
    """``model`` with a training run's ``checkpoints/latest`` pointer followed.

    A run directory, ``RUN/checkpoints/latest`` or ``RUN/checkpoints/latest/policy`` becomes
    ``RUN/checkpoints/iter-N/policy``, its newest complete checkpoint's policy (``latest``
    is a file naming it, not a folder); anything else is returned as it is. Raises
    ConfigError when such a run has no complete checkpoint.
    """
    path = Path(model).expanduser()
    if path.name == "policy" and path.parent.name == LATEST:
        path = path.parent
    if path.name == LATEST and path.parent.name == CHECKPOINTS:
        path = path.parent.parent
    elif not (path / CHECKPOINTS / LATEST).is_file():
        return model
    ckpt = RunDir(path).latest_checkpoint()
    if ckpt is None:
        raise ConfigError(f"model {model!r}: the run {str(path)!r} has no complete checkpoint "
                          f"({CHECKPOINTS}/{LATEST} names none); train it, or pass a policy folder")
    return str(ckpt / "policy")


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

    def read_config(self, cls: type[C]) -> C:
        """The config (of dataclass ``cls``) this run was started with."""
        if not self.config_path.is_file():
            raise ConfigError(
                f"{self.config_path} does not exist; is {self.path} a run directory of `taurl train`?"
            )
        return config_from_dict(cls, yaml.safe_load(self.config_path.read_text()))

    def init(self, cfg: object) -> None:
        """Create the run directory for ``cfg``; refuse one that belongs to another run."""
        if self.config_path.exists():
            old = self.read_config(type(cfg))
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
        snap = snapshot_checkpoint(iteration, learner, model_path, copy=False)
        return self.write_checkpoint(snap, keep)

    def write_checkpoint(self, snap: CheckpointSnapshot, keep: int) -> Path:
        """Write a :func:`snapshot_checkpoint` as :meth:`save_checkpoint` does (any thread)."""
        from taurl.learners import checkpoint

        name = f"iter-{snap.iteration:06d}"
        tmp = self.checkpoints / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if snap.learner is not None:
            checkpoint.write(snap.learner, tmp / "learner")
        write_policy(snap.policy, snap.model_path, tmp / "policy")
        torch.save(snap.rng, tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps({"iteration": snap.iteration}))
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


class CheckpointSchedule:
    """When to write a checkpoint: every ``every`` iterations, or (``every`` 0) by time.

    By time, the first iteration of a run (or of a resume) is saved, which measures what
    a checkpoint costs; after that, one is due once the time since the last one ended
    is at least ``cost × (1 − budget) / budget``, so checkpoints take at most ``budget``
    of the run's time. A killed run resumes from the newest checkpoint, as always: it
    loses the iterations since then (at most about ``cost / budget`` seconds of work).
    """

    def __init__(self, every: int, budget: float, first: int) -> None:
        self.every, self.budget, self.first = every, budget, first
        self.cost = 0.0  # seconds the newest checkpoint took
        self.last_end = time.perf_counter()

    def due(self, iteration: int, busy: bool = False) -> bool:
        """Whether iteration ``iteration`` (just finished) should be saved; ``busy``: the
        previous checkpoint is still being written (by time, the next waits for its cost)."""
        if self.every:
            return (iteration + 1) % self.every == 0
        if iteration == self.first:
            return True
        if busy:
            return False
        since = time.perf_counter() - self.last_end
        return since >= self.cost * (1 - self.budget) / self.budget

    def saved(self, seconds: float) -> float:
        """Record that a checkpoint took ``seconds`` (copy and write), ending now; return them."""
        self.cost, self.last_end = seconds, time.perf_counter()
        return seconds


#: The policy folder's weights, as a learner checkpoint (``<iter>/learner``) names them.
POLICY_WEIGHTS = "../policy/model.safetensors"


@dataclass
class CheckpointSnapshot:
    """One iteration's checkpoint in memory (copies): what :meth:`RunDir.write_checkpoint` writes."""

    iteration: int
    learner: LearnerSnapshot | None  # None off rank 0
    policy: dict[str, torch.Tensor]  # float32, Hugging Face names
    model_path: Path  # the base model's folder (config and tokenizer files)
    rng: dict[str, object]  # Python's and NumPy's random states


def snapshot_checkpoint(iteration: int, learner: Learner, model_path: Path,
                        copy: bool = True) -> CheckpointSnapshot:
    """Iteration ``iteration``'s checkpoint in memory; with ``copy`` the learner may train on
    while it is written (without, it holds the learner's own weights and optimizer state).

    Under torchrun every rank makes the same collective calls (``_follow``: the learner's
    ``save``, whose barrier comes after its gather, then ``state_dict_for_sync``).
    """
    from taurl.learners import checkpoint
    from taurl.learners import distributed as D

    # Without LoRA or a value head the float32 policy *is* the trained weights: written
    # once, in the policy folder, which the learner's checkpoint then reads (a test resumes)
    once = checkpoint.policy_is_all_weights(learner)
    snap = checkpoint.snapshot(learner, copy, weights_from=POLICY_WEIGHTS if once else None)
    D.barrier()
    # float32, and said so in config.json: RL updates at small learning rates are often
    # below bf16's resolution, so a bf16 export can round the learned change away.
    policy = {k: v.contiguous() for k, v in learner.state_dict_for_sync(torch.float32, copy).items()}
    return CheckpointSnapshot(iteration, snap, policy, model_path,
                              {"python": random.getstate(), "numpy": np.random.get_state()})


def write_policy(state: dict[str, torch.Tensor], model_path: Path, out: Path) -> None:
    """Write a policy's float32 weights as a Hugging Face folder (config, tokenizer, safetensors)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in model_path.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "taurl-model.json":
            shutil.copy2(f, out / f.name)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))


class CheckpointWriter:
    """Writes checkpoints in a background thread, one at a time, while training goes on.

    :meth:`start` takes a :class:`CheckpointSnapshot` (made on the training thread) and
    returns at once; the files appear atomically as :meth:`RunDir.write_checkpoint` makes
    them, so a run killed mid-write resumes from the checkpoint before (it loses the
    iteration being written too). A write's error is raised by the next :meth:`start` or
    :meth:`wait`. ``on_done(seconds)`` is called (in the writer thread) after each write
    with the seconds since :meth:`start`'s ``started`` (the snapshot's start: the whole cost).
    """

    def __init__(self, run: RunDir, keep: int, on_done: Callable[[float], object]) -> None:
        self.run, self.keep, self.on_done = run, keep, on_done
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_write_s: float | None = None  # set when a write ends; the trainer logs it

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, snap: CheckpointSnapshot, started: float | None = None) -> None:
        """Write ``snap`` in the background (after the write in progress, if any, ends)."""
        self.wait()
        self._thread = threading.Thread(
            target=self._write, args=(snap, started or time.perf_counter()), daemon=True,
            name=f"taurl-checkpoint-{snap.iteration}")
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in progress (if any) is on disk; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write(self, snap: CheckpointSnapshot, started: float) -> None:
        t0 = time.perf_counter()
        try:
            self.run.write_checkpoint(snap, self.keep)
        except Exception as e:  # noqa: BLE001 -- handed to the training thread by wait()
            self._error = e
            return
        end = time.perf_counter()
        self.last_write_s = end - t0
        self.on_done(end - started)


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



def sample_text(t: Trajectory) -> str:
    """One trajectory as Markdown, for ``samples.md``."""
    lines = [f"### {t.env_id} {t.task_id} · return {t.episode_return:.2f} · {t.termination}"]
    for m in t.messages:
        lines.append(f"**{m.get('role')}**: {m.get('content')}")
    return "\n\n".join(lines) + "\n\n"


class MetricsLog:
    """``metrics.jsonl`` (one fsynced line per iteration), and TensorBoard when asked for."""

    def __init__(self, run: RunDir, tensorboard: bool) -> None:
        self.path = run.path / "metrics.jsonl"
        self.samples_path = run.path / "samples.md"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run.path / "tb"))
            except ImportError:
                print("taurl: tensorboard is not installed; metrics go to metrics.jsonl only")

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        """Append one iteration's metrics."""
        row = {"iteration": iteration, **metrics}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, iteration)
            self.tb.flush()

    def samples(self, iteration: int, trajectories: list[Trajectory]) -> None:
        """Append ``trajectories`` to ``samples.md`` under the iteration's heading."""
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.write(f"## iteration {iteration}\n\n")
            f.writelines(sample_text(t) for t in trajectories)

    def close(self) -> None:
        """Close the TensorBoard writer."""
        if self.tb is not None:
            self.tb.close()
