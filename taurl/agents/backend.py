"""The inference-backend interface every agent loop talks to, and what backends share.

A backend turns prompt token ids into sampled token ids with the sampler's
log-probs. It is async and takes many requests in flight (continuous batching is
the backend's business), and it accepts new policy weights between iterations.

Implementations (one module each, imported lazily by :func:`make_backend`):

- ``"vllm"`` → :class:`taurl.agents.vllm_backend.VLLMBackend`: vLLM's async engine
  in this process (the default);
- ``"vllm-server"`` → :class:`taurl.agents.server_backend.VLLMServerBackend`:
  ``vllm serve`` replicas over HTTP;
- ``"hf"`` → :class:`taurl.agents.hf_backend.HFBackend`: transformers, the fallback
  and the reference for log-prob checks.

Every backend runs its engine, HTTP client or model on a private event loop in a
background thread (:class:`BackgroundLoop`). Its coroutines can therefore be
awaited from any event loop — one ``asyncio.run`` per test, a trainer's loop, a
notebook's — while the engine's own tasks and connection pools stay on one loop
for the backend's whole life.

Log-probs are the model's own: ``log_softmax(logits)`` of the sampled token before
temperature / top-p / top-k (vLLM's ``raw_logprobs``), i.e. what a learner
recomputes from the same weights. Token ids hold every sampled token, EOS and the
tokens that spell a stop string included, so an agent never re-tokenizes.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import difflib
import importlib
import json
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Self, TypeVar

from taurl.agents.config import BACKENDS
from taurl.errors import BackendError
from taurl.types import Generation, SamplingParams

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


class ContextLengthError(BackendError):
    """A prompt leaves no room for even one new token within the backend's ``max_model_len``."""


class SessionRouter:
    """Which replica serves a request: sticky sessions, else the least busy replica.

    An episode (``session_id``) stays on the replica that served it, whose prefix cache
    holds its conversation, while that replica is healthy; a new or displaced episode goes
    to the candidate with the fewest requests in flight. At most ``max_sessions`` are
    remembered (least recently used forgotten first). Used by the backends with several
    replicas (``vllm-server`` and Ray engine actors).
    """

    def __init__(self, max_sessions: int = 100_000) -> None:
        self._sessions: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.max_sessions = max_sessions
        self.rerouted = 0  # requests moved off their session's replica because it was down

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str) -> int | None:
        """The replica a session is kept on (None before its first request)."""
        return self._sessions.get(session_id)

    def sticky(self, session_id: str | None, healthy: Callable[[int], bool]) -> int | None:
        """The session's own replica while it is healthy; None when the request must be
        routed (a new session, or its replica is down: counted in :attr:`rerouted`)."""
        if session_id is None or session_id not in self._sessions:
            return None
        i = self._sessions[session_id]
        self._sessions.move_to_end(session_id)
        if healthy(i):
            return i
        self.rerouted += 1
        return None

    def assign(self, session_id: str | None, candidates: Sequence[int],
               in_flight: Callable[[int], int]) -> int:
        """Route to the candidate with the fewest requests in flight and remember it."""
        i = min(candidates, key=in_flight)
        if session_id is not None:
            self._sessions[session_id] = i
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return i


class InferenceBackend(abc.ABC):
    """Token ids in, token ids + log-probs out; new weights in between iterations."""

    #: The learner step whose weights this backend samples with (recorded in Trajectories).
    policy_version: int = 0
    #: Most tokens (prompt + new) one sequence may hold; prompts must leave room for one more.
    max_model_len: int = 2048

    @abc.abstractmethod
    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        *,
        session_id: str | None = None,
    ) -> Generation:
        """Sample one continuation of ``prompt_token_ids``.

        ``session_id`` names the episode the request belongs to, so a backend with
        several replicas can keep an episode on one replica (prefix cache). Many
        calls may be awaited concurrently. ``sampling.max_tokens`` is clipped to the
        room left in ``max_model_len`` (the result then ends with ``"length"``); a
        prompt of ``max_model_len`` tokens or more raises :class:`ContextLengthError`.
        """

    @abc.abstractmethod
    async def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Load new policy weights (HF parameter names) and set ``policy_version``.

        Returns once every replica samples with the new weights. Requests already in
        flight finish first with the old weights, so one Generation never mixes two
        policies. The tensors may be the learner's own parameters (the trainer passes
        them without a copy): a backend copies what it keeps before returning.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release engines, processes and connections. Idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def make_backend(kind: str, model: str | Path, **options: object) -> InferenceBackend:
    """Build the backend ``kind`` (a key of :data:`taurl.agents.config.BACKENDS`) serving ``model``.

    ``model`` is anything :func:`taurl.models.resolve_model` accepts; ``options`` go
    to the backend's constructor (see its docstring). An unknown kind lists the
    valid ones.
    """
    if kind not in BACKENDS:
        close = difflib.get_close_matches(kind, list(BACKENDS), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BackendError(
            f"unknown inference backend {kind!r}; expected one of {sorted(BACKENDS)}.{hint}"
        )
    module_name, cls_name = BACKENDS[kind].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(model, **options)  # type: ignore[no-any-return]


def check_prompt(prompt_token_ids: list[int], sampling: SamplingParams, max_model_len: int) -> int:
    """Validate a prompt and return ``max_tokens`` clipped to the room left in the context.

    Raises :class:`ContextLengthError` when the prompt leaves no room for a token and
    ``BackendError`` for an empty prompt or a non-integer token id.
    """
    if not prompt_token_ids:
        raise BackendError("generate() got an empty prompt; expected at least one token id")
    if not all(isinstance(t, int) and t >= 0 for t in prompt_token_ids):
        bad = next(t for t in prompt_token_ids if not (isinstance(t, int) and t >= 0))
        raise BackendError(f"prompt token ids must be non-negative ints, got {bad!r}")
    room = max_model_len - len(prompt_token_ids)
    if room < 1:
        raise ContextLengthError(
            f"prompt has {len(prompt_token_ids)} tokens but the backend's max_model_len is "
            f"{max_model_len}; shorten the conversation or raise max_model_len"
        )
    return min(sampling.max_tokens, room)


class BackgroundLoop:
    """An event loop running forever in a daemon thread, owned by one backend.

    :meth:`run` awaits a coroutine on this loop from any other loop; cancelling the
    awaiting task cancels the coroutine here too.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[object, object, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on this loop; wait on the returned future from any thread."""
        if self.loop.is_closed():
            coro.close()
            raise BackendError("the backend is closed; create a new one")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[object, object, T]) -> T:
        """Await ``coro`` running on this loop from the caller's loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def run_sync(self, coro: Coroutine[object, object, T]) -> T:
        """Run ``coro`` on this loop and block the calling thread until it ends."""
        return self.submit(coro).result()

    def stop(self) -> None:
        """Stop the loop and join its thread. Idempotent."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class LoopBackend(InferenceBackend):
    """A backend whose engine, client or model lives on its own :class:`BackgroundLoop`.

    ``generate`` checks the prompt, clips ``sampling.max_tokens`` to the room left
    and awaits :meth:`_generate` on ``self._loop`` (a backend closed by then raises
    ``BackendError``); ``close`` runs :meth:`_shutdown` there, stops the loop, then
    calls :meth:`_after_stop`. A subclass sets ``self._loop`` in its constructor and
    writes those three methods.
    """

    _loop: BackgroundLoop
    _closed: bool = False

    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        *,
        session_id: str | None = None,
    ) -> Generation:
        """Sample one continuation; see :meth:`InferenceBackend.generate`."""
        max_tokens = check_prompt(prompt_token_ids, sampling, self.max_model_len)
        sampling = dataclasses.replace(sampling, max_tokens=max_tokens)
        prompt = list(prompt_token_ids)
        return await self._loop.run(self._generate_open(prompt, sampling, session_id))

    async def _generate_open(
        self, prompt: list[int], sampling: SamplingParams, session_id: str | None
    ) -> Generation:
        # checked on the loop: a request queued behind close() fails instead of starting
        if self._closed:
            raise BackendError(f"{type(self).__name__} is closed; create a new one")
        return await self._generate(prompt, sampling, session_id)

    @abc.abstractmethod
    async def _generate(
        self, prompt: list[int], sampling: SamplingParams, session_id: str | None
    ) -> Generation:
        """Sample on ``self._loop``; ``sampling.max_tokens`` already fits the context."""

    async def close(self) -> None:
        """Release engines, processes and connections, and stop the loop thread. Idempotent."""
        self.close_sync()

    def close_sync(self) -> None:
        """:meth:`close` for code without an event loop (fixtures, ``atexit``)."""
        if self._closed:
            return
        self._closed = True
        self._loop.run_sync(self._shutdown())
        self._loop.stop()
        self._after_stop()

    @abc.abstractmethod
    async def _shutdown(self) -> None:
        """Release what lives on ``self._loop`` (tasks, engines, connections)."""

    def _after_stop(self) -> None:
        """Release what outlives the loop (processes, actors); nothing by default."""


@contextlib.contextmanager
def weights_checkpoint(
    state_dict: Mapping[str, torch.Tensor], config_dir: Path, parent: Path | None = None
) -> Iterator[Path]:
    """A one-file HF checkpoint of ``state_dict`` that vLLM's ``reload_weights`` reads.

    The new folder (under ``parent``, default the system temp dir) holds the model's
    ``config.json`` copied from ``config_dir`` and ``model.safetensors``; it is deleted
    when the ``with`` block ends. Tensors that share storage (tied embeddings) are
    cloned, since safetensors refuses aliases.
    """
    from safetensors.torch import save_file

    out = Path(tempfile.mkdtemp(prefix="taurl-weights-", dir=parent))
    try:
        shutil.copyfile(config_dir / "config.json", out / "config.json")
        seen: set[int] = set()
        tensors = {}
        for name, tensor in state_dict.items():
            t = tensor.detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[name] = t
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def model_max_len(model_dir: Path) -> int:
    """``max_position_embeddings`` from a model folder's config.json (8192 when absent)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    return int(cfg.get("max_position_embeddings", 8192))


def torch_dtype_of(dtype: str, model_path: Path) -> torch.dtype:
    """The torch dtype named by ``dtype``; ``"auto"`` means the checkpoint's (float32 if unsaid).

    Raises:
        BackendError: ``dtype`` names no floating-point torch dtype.
    """
    import torch

    if dtype == "auto":
        config = json.loads((model_path / "config.json").read_text())
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    names = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "half": torch.float16}
    if dtype not in names:
        raise BackendError(
            f"dtype must be one of auto, {', '.join(names)}, got {dtype!r}"
        )
    return names[dtype]
