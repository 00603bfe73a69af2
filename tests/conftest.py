"""Session-wide fixtures: the tiny model and one shared vLLM engine.

Starting vLLM costs 30-60 s on 2 CPU cores, so the whole test session shares one
engine. Usage from any test (async code runs with ``asyncio.run``; the backend's
engine lives on its own loop thread, so every test may use a fresh loop)::

    def test_something(vllm_tiny: VLLMBackend) -> None:
        gen = asyncio.run(vllm_tiny.generate([1, 2, 3], SamplingParams(max_tokens=8)))

``vllm_tiny`` runs in float32 so its log-probs match a transformers recomputation
within 1e-5. A test that loads other weights into it takes ``vllm_tiny_mutable``
instead: the same engine, given back with the tiny model's own weights (and
``policy_version`` 0) after the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from taurl.models import resolve_model

if TYPE_CHECKING:
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
