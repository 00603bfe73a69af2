"""transformers backend: batched sampling for machines without vLLM, and the log-prob reference.

Requests that arrive while a batch runs wait for the next one; each batch is
left-padded and decoded with a KV cache in one worker thread, so the event loop
stays free. Sampling is done here rather than by ``model.generate`` because every
request carries its own temperature, top-p, top-k, seed, token budget and stop
strings, and the sampler's log-prob of each token is needed.

Log-probs are ``log_softmax`` of the float32 logits before temperature / top-p /
top-k — the same quantity as vLLM's ``raw_logprobs`` and what a learner recomputes.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from taurl.agents.backend import BackgroundLoop, LoopBackend, torch_dtype_of
from taurl.errors import BackendError
from taurl.models import cpu_has_native_bf16, resolve_model
from taurl.types import FinishReason, Generation, SamplingParams

if TYPE_CHECKING:
    import torch


@dataclass
class _Request:
    prompt: list[int]
    sampling: SamplingParams  # max_tokens already clipped to the context
    future: asyncio.Future[Generation]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishReason | None = None


class HFBackend(LoopBackend):
    """A transformers causal LM behind the backend interface.

    Args:
        model: a built-in model name, a folder, or a cached hub id (``resolve_model``).
        dtype: the weights' dtype: ``"float32"`` (reference log-probs), ``"bfloat16"``,
            ``"float16"``, or ``"auto"``: the checkpoint's, except float32 on CPUs without
            native bf16 (as :class:`~taurl.agents.vllm_backend.VLLMBackend`).
        device: torch device; None = ``"cuda"`` when available, else ``"cpu"``.
        max_batch_size: most requests decoded together in one batch.
        max_model_len: most tokens (prompt + new) in one sequence.
        seed: seeds the sampling of requests that bring no seed of their own.
        num_threads: torch's intra-op threads (``torch.set_num_threads``, which is
            process-wide); None leaves torch's setting. On a machine whose cores are
            busy with other work, 1 can be many times faster than more: threads that
            wait for a descheduled sibling spin at every operation.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str = "float32",
        device: str | None = None,
        max_batch_size: int = 64,
        max_model_len: int = 2048,
        seed: int = 0,
        num_threads: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if max_batch_size < 1:
            raise BackendError(f"HFBackend max_batch_size must be >= 1, got {max_batch_size}")
        if max_model_len < 2:
            raise BackendError(f"HFBackend max_model_len must be >= 2, got {max_model_len}")
        if num_threads is not None:
            if num_threads < 1:
                raise BackendError(f"HFBackend num_threads must be >= 1 or None, got {num_threads}")
            torch.set_num_threads(num_threads)
        self.num_threads = torch.get_num_threads()
        self.model_path = resolve_model(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto" and self.device.type == "cpu" and not cpu_has_native_bf16():
            dtype = "float32"  # bf16 is emulated, and several times slower, on such CPUs
        try:
            torch_dtype = torch_dtype_of(dtype, self.model_path)
        except BackendError as e:
            raise BackendError(f"HFBackend {e}") from None
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids, default=0)
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.policy_version = 0
        self._rng = random.Random(seed)
        self._loop = BackgroundLoop(name="taurl-hf")
        self._queue: list[_Request] = []
        self._wakeup = asyncio.Event()
        self._model_lock = asyncio.Lock()
        self._worker = self._loop.run_sync(self._start_worker())

    async def _start_worker(self) -> asyncio.Task[None]:
        # asyncio primitives made outside the loop bind to it on first use (Python >= 3.10).
        return asyncio.get_running_loop().create_task(self._serve())

    # -- generation ----------------------------------------------------------------

    async def _generate(
        self, prompt: list[int], sampling: SamplingParams, session_id: str | None
    ) -> Generation:
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(prompt, sampling, future))
        self._wakeup.set()
        return await future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = [r for r in self._queue[: self.max_batch_size] if not r.future.done()]
                del self._queue[: self.max_batch_size]
                if not batch:
                    continue
                async with self._model_lock:
                    try:
                        await loop.run_in_executor(None, self._decode, batch)
                    except Exception as e:  # noqa: BLE001 - delivered to every waiting caller
                        for r in batch:
                            if not r.future.done():
                                r.future.set_exception(
                                    BackendError(f"HF generation failed: {type(e).__name__}: {e}")
                                )
                        continue
                for r in batch:
                    if not r.future.done():
                        finish = r.finish or "length"
                        r.future.set_result(Generation(r.tokens, r.logprobs, finish))

    def _decode(self, batch: list[_Request]) -> None:
        """Decode ``batch`` to the end, filling each request's tokens, logprobs and finish."""
        import torch
        from transformers import DynamicCache

        B = len(batch)
        width = max(len(r.prompt) for r in batch)
        ids_B_L = torch.full((B, width), self.pad_token_id, dtype=torch.long)
        mask_B_L = torch.zeros((B, width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every prompt ends at column width-1
            ids_B_L[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask_B_L[i, width - len(r.prompt) :] = 1
        gens = [self._generator(r.sampling) for r in batch]
        ids_B_L, mask_B_L = ids_B_L.to(self.device), mask_B_L.to(self.device)
        cache = DynamicCache()
        step_ids_B_L = ids_B_L
        longest = max(r.sampling.max_tokens for r in batch)
        with torch.inference_mode():
            for _ in range(longest):
                pos_B_L = (mask_B_L.cumsum(-1) - 1).clamp(min=0)[:, -step_ids_B_L.shape[1] :]
                out = self.model(
                    input_ids=step_ids_B_L,
                    attention_mask=mask_B_L,
                    position_ids=pos_B_L,
                    past_key_values=cache,
                    use_cache=True,
                )
                cache = out.past_key_values
                logits_B_V = out.logits[:, -1, :].float()
                logp_B_V = logits_B_V.log_softmax(-1)
                next_B = torch.full((B,), self.pad_token_id, dtype=torch.long)
                for i, r in enumerate(batch):
                    if r.finish is not None:
                        continue
                    tok = _sample(logits_B_V[i], r.sampling, gens[i])
                    next_B[i] = tok
                    r.tokens.append(tok)
                    r.logprobs.append(float(logp_B_V[i, tok]))
                    r.finish = self._finished(r, tok)
                if all(r.finish is not None for r in batch):
                    break
                step_ids_B_L = next_B[:, None].to(self.device)
                mask_B_L = torch.cat([mask_B_L, torch.ones_like(step_ids_B_L)], dim=1)

    def _generator(self, sampling: SamplingParams) -> torch.Generator:
        import torch

        seed = sampling.seed if sampling.seed is not None else self._rng.getrandbits(63)
        return torch.Generator(device="cpu").manual_seed(seed)

    def _finished(self, r: _Request, tok: int) -> FinishReason | None:
        if tok in self.eos_token_ids:
            return "stop"
        if r.sampling.stop:
            text = self.tokenizer.decode(r.tokens)
            if any(s in text for s in r.sampling.stop):
                return "stop"
        if len(r.tokens) >= r.sampling.max_tokens:
            return "length"
        return None

    # -- weights -------------------------------------------------------------------

    async def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy ``state_dict`` into the model between batches; see the interface docstring."""
        await self._loop.run(self._load(state_dict))
        self.policy_version = version

    async def _load(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        async with self._model_lock:
            missing, unexpected = self.model.load_state_dict(dict(state_dict), strict=False)
            # tied weights may come under either name; anything else missing is an error
            tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
            missing = [m for m in missing if m not in tied]
            if missing or unexpected:
                raise BackendError(
                    f"update_weights got a state dict that does not fit the model: missing "
                    f"{missing[:5]}, unexpected {unexpected[:5]}; pass the policy's full "
                    "state_dict() with Hugging Face parameter names"
                )

    # -- lifecycle -----------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Stop the batching task and fail the requests still queued."""
        self._worker.cancel()
        for r in self._queue:
            if not r.future.done():
                r.future.set_exception(BackendError("HFBackend closed before this request ran"))
        self._queue.clear()


def _sample(logits_V: torch.Tensor, sampling: SamplingParams, gen: torch.Generator) -> int:
    """Draw one token id from ``logits_V`` [V] (float32) with temperature, top-k and top-p."""
    import torch

    if sampling.temperature == 0:
        return int(logits_V.argmax())
    scaled_V = (logits_V / sampling.temperature).cpu()
    if 0 < sampling.top_k < scaled_V.shape[0]:
        kth = scaled_V.topk(sampling.top_k).values[-1]
        scaled_V = scaled_V.masked_fill(scaled_V < kth, float("-inf"))
    probs_V = scaled_V.softmax(-1)
    if sampling.top_p < 1.0:
        sorted_V, order_V = probs_V.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        drop_V = sorted_V.cumsum(-1) - sorted_V >= sampling.top_p
        sorted_V = sorted_V.masked_fill(drop_V, 0.0)
        probs_V = torch.zeros_like(probs_V).scatter(0, order_V, sorted_V)
    return int(torch.multinomial(probs_V, 1, generator=gen))
