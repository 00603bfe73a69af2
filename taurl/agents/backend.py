"""The inference-backend interface every agent loop talks to.

A backend turns prompt token ids into sampled token ids with the sampler's
log-probs. It is async and takes many requests in flight (continuous batching is
the backend's business), and it accepts new policy weights between iterations.

Implementations: ``VLLMBackend`` (vLLM in-process, the default), ``VLLMServerBackend``
(``vllm serve`` over HTTP, several replicas) and ``HFBackend`` (transformers; the
fallback and the reference for log-prob checks).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING

from taurl.types import Generation, SamplingParams

if TYPE_CHECKING:
    import torch


class InferenceBackend(abc.ABC):
    """Token ids in, token ids + log-probs out; new weights in between iterations."""

    #: The learner step whose weights this backend samples with (recorded in Trajectories).
    policy_version: int = 0

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
        calls may be awaited concurrently.
        """

    @abc.abstractmethod
    async def update_weights(
        self, state_dict: Mapping[str, torch.Tensor], version: int
    ) -> None:
        """Load new policy weights (HF parameter names) and set ``policy_version``.

        Returns once every replica samples with the new weights.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release engines, processes and connections. Idempotent."""

    async def __aenter__(self) -> InferenceBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
