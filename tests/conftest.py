"""Session-wide fixtures: the tiny model and one shared vLLM engine.

Starting vLLM costs 30-60 s on 2 CPU cores, so the whole test session shares one
engine. Usage from any test (async code runs with ``asyncio.run``; the backend's
engine lives on its own loop thread, so every test may use a fresh loop)::

    def test_something(vllm_tiny: VLLMBackend) -> None:
        gen = asyncio.run(vllm_tiny.generate([1, 2, 3], SamplingParams(max_tokens=8)))

``vllm_tiny`` runs in float32 so its log-probs match a transformers recomputation
within 1e-5. A test that loads other weights into it takes ``vllm_tiny_mutable``
instead: the same engine, given back with the tiny model's own weights (and
``policy_version`` 0) after the test. ``record_sampling(backend)`` wraps a backend so
that a test sees the sampling settings each request actually reached it with.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from taurl.agents.backend import InferenceBackend
from taurl.models import resolve_model
from taurl.types import Generation, SamplingParams

# taurl/Code-v0 refuses a sandbox with only its guard mode (no kernel isolation: not root
# and no user namespaces). The suite runs its own trusted programs, so it opts in; the
# refusal itself is tested with the variable removed (tests/envs/test_code_env.py).
os.environ.setdefault("TAURL_ALLOW_WEAK_SANDBOX", "1")

if TYPE_CHECKING:
    import torch

    from taurl.agents.vllm_backend import VLLMBackend


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """Folder of the 2-layer random Llama with SmolLM2's tokenizer (prepared once, cached)."""
    return resolve_model("tiny-random")


@pytest.fixture(scope="session")
def vllm_tiny(tiny_model_path: Path) -> Iterator[VLLMBackend]:
    """One in-process vLLM engine on the tiny model for the whole session (float32, seed 0)."""
    from taurl.agents.vllm_backend import VLLMBackend

    backend = VLLMBackend(tiny_model_path, dtype="float32", max_model_len=4096, seed=0)
    try:
        yield backend
    finally:
        backend.close_sync()


@pytest.fixture
def vllm_tiny_mutable(vllm_tiny: VLLMBackend, tiny_model_path: Path) -> Iterator[VLLMBackend]:
    """``vllm_tiny`` for a test that calls ``update_weights``; restored afterwards."""
    from safetensors.torch import load_file

    try:
        yield vllm_tiny
    finally:
        state = load_file(str(tiny_model_path / "model.safetensors"))
        asyncio.run(vllm_tiny.update_weights(state, version=0))


class SamplingRecorder(InferenceBackend):
    """A real backend that also records ``(session_id, sampling)`` of every request it serves.

    Session ids are ``"{env_id}:{split}:{task}:{seed}/{sample_seed}"`` (the runner's
    group id), so a test can tell held-out requests from training ones.
    """

    def __init__(self, inner: InferenceBackend) -> None:
        self.inner = inner
        self.requests: list[tuple[str, SamplingParams]] = []
        self.max_model_len = inner.max_model_len
        self.weight_dtype = getattr(inner, "weight_dtype", None)

    @property  # type: ignore[override]
    def policy_version(self) -> int:
        return self.inner.policy_version

    async def generate(
        self, prompt_token_ids: list[int], sampling: SamplingParams, *, session_id: str | None = None
    ) -> Generation:
        self.requests.append((session_id or "", sampling))
        return await self.inner.generate(prompt_token_ids, sampling, session_id=session_id)

    async def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        await self.inner.update_weights(state_dict, version)

    async def close(self) -> None:
        """Leaves the wrapped backend open: the session's engine outlives the test."""


@pytest.fixture
def record_sampling() -> Callable[[InferenceBackend], SamplingRecorder]:
    """Wraps a backend in a :class:`SamplingRecorder`."""
    return SamplingRecorder
