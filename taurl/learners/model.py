"""The policy in torch: loading, LoRA, value heads, and per-token log-probs in chunks.

Per-token tensors are aligned with the tokens they describe: ``logp_B_T[b, t]`` is
the log-prob of token ``t`` given tokens ``< t`` (read from the hidden state at
``t - 1``), and ``values_B_T[b, t]`` is V of the state in which token ``t`` was
sampled. Position 0 has no context and is always 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from taurl.errors import ConfigError, ModelError
from taurl.learners.config import LoraConfig
from taurl.learners.forward import decoder_hidden
from taurl.models import cpu_has_native_bf16


def pick_device(name: str) -> torch.device:
    """``"auto"`` → cuda when a GPU is present, else cpu; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"learner.device {name!r} is not a torch device ({e}); use auto, cpu "
                          "or cuda") from e


def keep_freed_memory() -> bool:
    """Have glibc's allocator keep freed memory for reuse (this process, from now on).

    By default glibc serves allocations above its mmap threshold (128 KiB, rising to at
    most 32 MiB) with fresh ``mmap`` pages and unmaps them on free, and trims the heap top:
    every update page-faults its logits, gradients and activations in again and the kernel
    zeroes them. Measured on SmolLM2-135M float32, 16 rows × ~90 tokens, 2-core EPYC
    (``benchmarks/learner.py --unmapped-memory``): 150k–1M minor faults and 0.5–3.5 s of
    system time per update, all but gone with this; the update's time changed within this
    machine's noise (0.96×–1.14× over three comparisons); peak RSS the same. (If the heap cannot
    grow, glibc still maps memory for it: this stops only the per-allocation mappings.)
    Returns False where there is no glibc.
    """
    import ctypes
    import ctypes.util

    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def pick_autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``learner.dtype`` on ``device``; None means plain float32.

    ``auto`` uses bf16 on CUDA GPUs that support it and on CPUs with native bf16
    (there it measured 2.4× faster than float32 for SmolLM2-135M); elsewhere bf16 is
    emulated and slower, so ``auto`` stays in float32.
    """
    if dtype == "float32":
        return None
    if dtype == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device``, or a no-op context for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def load_causal_lm(path: str | Path, device: torch.device) -> nn.Module:
    """A Hugging Face causal LM from a local folder, float32 master weights, on ``device``."""
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"model folder {folder} has no config.json; pass a local Hugging Face folder "
            "(resolve names such as 'smollm2-135m' with taurl.models.resolve_model first)"
        )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.to(device)


def add_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters; only the adapters are trainable."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError as e:
        raise ConfigError(
            "learner.lora.rank > 0 needs peft; install it with: pip install 'taurl[lora]' "
            "(or set learner.lora.rank=0 for full fine-tuning)"
        ) from e
    cfg = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
    )
    return get_peft_model(model, cfg)


def is_peft(model: nn.Module) -> bool:
    """True for a peft-wrapped model."""
    return hasattr(model, "get_base_model") and hasattr(model, "disable_adapter")


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(decoder stack returning last_hidden_state, lm_head)`` of a causal LM (peft or not)."""
    base = model.get_base_model() if is_peft(model) else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Run a peft model without its adapters (the reference policy); no-op otherwise."""
    if is_peft(model):
        with model.disable_adapter():
            yield
    else:
        yield


def _compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype a Linear would run in here: autocast's when it is on, else float32."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


#: A :func:`token_logprobs` call whose sampled positions' float32 softmax takes at most this
#: many bytes keeps it from forward for backward; a larger one recomputes its logits in
#: backward, one chunk at a time. Keeping saves one vocabulary-sized matmul of four: the peer
#: benchmark's update (16 answers of SmolLM2, ~600 positions x 49,152 = 0.12 GB) keeps it;
#: the tool agent's micro-batches (~1,000 positions x 151,936 = 0.6 GB) recompute.
KEEP_SOFTMAX_BYTES = 256 * 2**20


class _ChunkLogprob(torch.autograd.Function):
    """log p(y | h) = (h W^T)[y] - logsumexp(h W^T) for a chunk of positions, and its entropy.

    With ``keep`` false it saves only ``h``, ``y`` and the ``logsumexp`` (one float per
    position); backward recomputes the chunk's logits once and forms ``g (onehot(y) -
    softmax)`` from the saved logsumexp, so no float32 vocabulary-sized tensor outlives its
    chunk. With ``keep`` it saves the chunk's softmax instead of recomputing it (see
    :data:`KEEP_SOFTMAX_BYTES`). The entropy is returned for monitoring, without gradient.
    """

    @staticmethod
    def forward(ctx, h_N_D, weight_V_D, y_N, keep: bool):
        dtype = _compute_dtype(h_N_D.device)
        logits = F.linear(h_N_D.to(dtype), weight_V_D.to(dtype)).float()
        lse = torch.logsumexp(logits, -1)
        logp = logits.gather(-1, y_N[:, None]).squeeze(-1) - lse
        logp_all = logits.sub_(lse[:, None])  # in place: the chunk's log-softmax
        probs = logp_all.exp()
        entropy = -(logp_all.mul_(probs)).sum(-1)
        ctx.save_for_backward(h_N_D, weight_V_D, y_N, lse, probs if keep else None)
        ctx.dtype = dtype
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp_N, _grad_entropy):
        h, weight, y, lse, probs = ctx.saved_tensors
        dtype = ctx.dtype
        if probs is None:
            logits = F.linear(h.to(dtype), weight.to(dtype)).float()
            probs = logits.sub_(lse[:, None]).exp_()
            grad_logits = probs.mul_(-grad_logp_N[:, None])
        else:
            grad_logits = probs.mul(-grad_logp_N[:, None])
        # d logp / d logits = onehot(y) - softmax; scaled by the upstream gradient
        grad_logits.scatter_add_(-1, y[:, None], grad_logp_N[:, None])
        g = grad_logits.to(dtype)
        grad_h = (g @ weight.to(dtype)).to(h.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (g.t() @ h.to(dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


def token_logprobs(
    hidden_B_T_D: torch.Tensor,
    lm_head: nn.Module,
    input_ids_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    chunk_tokens: int,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of the policy at the sampled tokens only, in chunks.

    Only positions with mask 1 go through the vocabulary projection, ``chunk_tokens``
    at a time, and each chunk's float32 logits are recomputed in backward, so at most
    one chunk × vocabulary of float32 exists at once (never the whole batch's) — unless
    the whole call's softmax fits :data:`KEEP_SOFTMAX_BYTES`, which is then kept instead.

    Args:
        hidden_B_T_D: [B, T, D] last hidden states (position t predicts token t + 1).
        lm_head: the vocabulary projection.
        input_ids_B_T: int64 [B, T].
        mask_B_T: 0/1 [B, T], the tokens to score (mask[:, 0] is ignored).
        chunk_tokens: tokens per chunk.
        entropy_grad: let gradient flow through the entropy (for an entropy bonus).

    Returns:
        ``(logp_B_T, entropy_B_T)``, float32, 0 where mask is 0; the entropy at token t
        is that of the distribution token t was drawn from.
    """
    B, T = input_ids_B_T.shape
    b, t = (mask_B_T[:, 1:] > 0).nonzero(as_tuple=True)
    h_N_D = hidden_B_T_D[b, t]
    targets_N = input_ids_B_T[b, t + 1]
    # A plain bias-free projection takes the lean path; an entropy bonus (or a head
    # with a bias) takes the generic checkpointed one.
    fused = isinstance(lm_head, nn.Linear) and lm_head.bias is None and not entropy_grad

    def score(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = lm_head(h).float()
        lse = torch.logsumexp(logits, -1)
        logp = logits.gather(-1, y[:, None]).squeeze(-1) - lse
        entropy = lse - (F.softmax(logits, -1) * logits).sum(-1)
        return logp, entropy

    # keep the softmax for backward when all of it is small (nothing to keep without grad)
    keep = fused and torch.is_grad_enabled() and (
        h_N_D.shape[0] * lm_head.weight.shape[0] * 4 <= KEEP_SOFTMAX_BYTES)
    logps, ents = [], []
    for start in range(0, h_N_D.shape[0], chunk_tokens):
        h, y = h_N_D[start : start + chunk_tokens], targets_N[start : start + chunk_tokens]
        if fused:
            lp, ent = _ChunkLogprob.apply(h, lm_head.weight, y, keep)
        elif torch.is_grad_enabled():
            lp, ent = checkpoint(score, h, y, use_reentrant=False)
        else:
            lp, ent = score(h, y)
        logps.append(lp)
        ents.append(ent)
    logp_B_T = hidden_B_T_D.new_zeros(B, T, dtype=torch.float32)
    ent_B_T = torch.zeros_like(logp_B_T)
    if logps:
        logp_B_T = logp_B_T.index_put((b, t + 1), torch.cat(logps))
        ent_B_T = ent_B_T.index_put((b, t + 1), torch.cat(ents))
    return logp_B_T, ent_B_T


def shifted_values(head: nn.Module, hidden_B_T_D: torch.Tensor) -> torch.Tensor:
    """float32 [B, T]: ``values[:, t] = head(hidden[:, t - 1])``, 0 at t = 0."""
    v = head(hidden_B_T_D[:, :-1]).squeeze(-1).float()
    return F.pad(v, (1, 0))


def new_value_head(hidden_size: int, device: torch.device) -> nn.Linear:
    """A linear value head initialised to 0: the critic starts by predicting 0 everywhere."""
    head = nn.Linear(hidden_size, 1, device=device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class ValueModel(nn.Module):
    """A separate critic: a transformer backbone from a folder with a linear value head."""

    def __init__(self, path: str | Path, device: torch.device) -> None:
        super().__init__()
        lm = load_causal_lm(path, device)
        self.backbone, _ = backbone_and_head(lm)
        self.head = new_value_head(lm.config.hidden_size, device)

    def forward(self, input_ids_B_T: torch.Tensor) -> torch.Tensor:
        """float32 [B, T] values, aligned as :func:`shifted_values`."""
        hidden = self.backbone(input_ids=input_ids_B_T, use_cache=False).last_hidden_state
        return shifted_values(self.head, hidden)


@dataclass
class PolicyOutput:
    """One forward of the policy over a micro-batch."""

    logp_B_T: torch.Tensor  # float32 [B, T], log-prob of each sampled token, 0 elsewhere
    entropy_B_T: torch.Tensor  # float32 [B, T], entropy at each sampled token, 0 elsewhere
    values_B_T: torch.Tensor | None  # float32 [B, T] from the value head, when there is one


def policy_forward(
    model: nn.Module,
    input_ids_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    chunk_tokens: int,
    value_head: nn.Module | None = None,
    entropy_grad: bool = False,
    share_prefix: bool = True,
) -> PolicyOutput:
    """Run the decoder over the rows; score the sampled tokens and, optionally, read the value head.

    ``share_prefix``: rows with the same prompt run it once (:func:`decoder_hidden`).
    """
    backbone, lm_head = backbone_and_head(model)
    # a value head reads every position, so its rows run whole (no length buckets)
    hidden = decoder_hidden(backbone, input_ids_B_T, mask_B_T, share_prefix,
                            buckets=value_head is None)
    logp, ent = token_logprobs(hidden, lm_head, input_ids_B_T, mask_B_T, chunk_tokens, entropy_grad)
    values = shifted_values(value_head, hidden) if value_head is not None else None
    return PolicyOutput(logp, ent, values)


def export_state_dict(
    model: nn.Module, dtype: torch.dtype | None = None, copy: bool = True
) -> dict[str, torch.Tensor]:
    """The policy's weights under Hugging Face names, LoRA merged in, for weight sync.

    Tied weights (e.g. ``lm_head.weight`` = ``model.embed_tokens.weight``) appear once,
    under the name that comes first, as ``save_pretrained`` writes them. Tensors are
    detached copies (the caller may keep them while training goes on); with ``copy=False``
    a tensor already in ``dtype`` is the parameter itself, detached (it changes with the
    next optimizer step).
    """
    if is_peft(model):
        from peft.tuners.lora import LoraLayer

        base = model.get_base_model()
        raw = base.state_dict()
        sd = {k.replace(".base_layer.", "."): v for k, v in raw.items() if "lora_" not in k}
        adapter = model.active_adapter
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and f"{name}.weight" in sd:
                key = f"{name}.weight"
                sd[key] = sd[key] + module.get_delta_weight(adapter).to(sd[key].dtype)
    else:
        sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in sd.items():
        ptr = v.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        v = v.detach().to(dtype=dtype or v.dtype)
        out[k] = v.clone() if copy else v
    return out
