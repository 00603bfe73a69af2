"""The learner's configuration: which algorithm, and how to run its updates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from taurl.errors import ConfigError
from taurl.learners.options import AlgorithmOptions, resolve
from taurl.learners.presets import get_preset

#: Data-parallel strategies under ``torchrun`` (``learner.parallel``).
PARALLEL = ("ddp", "fsdp2")


@dataclass
class LoraConfig:
    """Low-rank adapters through peft (``pip install 'taurl[lora]'``)."""

    rank: int = 0  # LoRA rank r; 0 trains every weight (full fine-tuning)
    alpha: float = 32.0  # LoRA scaling α (the update is scaled by α / r)
    dropout: float = 0.0  # dropout on the adapter's input
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"]
    )  # names of the Linear layers that get adapters

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"lora.rank must be >= 0 (0 = no LoRA), got {self.rank}")
        if self.rank and self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}; 2 × rank is common")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.rank and not self.target_modules:
            raise ConfigError("lora.target_modules is empty; name the Linear layers to adapt")


@dataclass
class LearnerConfig:
    """How the learner turns batches of trajectories into optimizer steps."""

    algorithm: str = "grpo"  # preset: reinforce | ppo | ppo_turn | grpo | dr_grpo | dapo | grpo_opd
    options: AlgorithmOptions = field(default_factory=AlgorithmOptions)  # overrides of the preset
    lr: float = 1e-6  # AdamW learning rate of the policy
    critic_lr: float = 1e-5  # AdamW learning rate of the value head / critic model
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW β1
    adam_beta2: float = 0.999  # AdamW β2
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    micro_batch_tokens: int = 8192  # padded tokens per forward/backward; more are accumulated
    logprob_chunk_tokens: int = 1024  # sampled tokens per chunk of the vocabulary log-softmax
    share_prefix: bool = True  # run a prompt several rows share once (KV cache), not per row
    # skip the forward/backward of rows whose loss gradient is exactly 0: every advantage 0
    # (a GRPO group whose samples all scored the same) and no entropy, KL-in-loss or value
    # term; the same update, less work (traj/* metrics then cover the rows that ran)
    skip_zero_grad_rows: bool = True
    dtype: Literal["auto", "bf16", "float32"] = "auto"  # auto: bf16 on CUDA / native-bf16 CPUs
    device: str = "auto"  # auto: cuda when a GPU is present, else cpu; or a torch device
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    # on CPU (glibc): keep freed memory for reuse instead of unmapping it, so each update
    # does not page-fault and re-zero its tensors; the process keeps its peak memory
    cpu_keep_freed_memory: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters (rank 0 = off)
    seed: int = 0  # seeds the minibatch shuffling
    # under torchrun with N > 1 processes: ddp (replicate the model) | fsdp2 (shard it)
    parallel: Literal["ddp", "fsdp2"] = "ddp"

    def __post_init__(self) -> None:
        get_preset(self.algorithm)
        for name in ("lr", "critic_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"learner.{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ConfigError(f"learner.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"learner.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.max_grad_norm < 0:
            raise ConfigError(
                f"learner.max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}"
            )
        if self.micro_batch_tokens < 1:
            raise ConfigError(
                f"learner.micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}; it "
                "should hold at least your longest trajectory (e.g. 8192)"
            )
        if self.logprob_chunk_tokens < 1:
            raise ConfigError(
                f"learner.logprob_chunk_tokens must be >= 1, got {self.logprob_chunk_tokens}"
            )
        if self.parallel not in PARALLEL:
            raise ConfigError(
                f"learner.parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}; "
                "ddp replicates the model on every process, fsdp2 shards it (for models that do "
                "not fit one device); it matters only under torchrun with more than one process"
            )
        if self.parallel == "fsdp2" and self.lora.rank:
            raise ConfigError(
                "learner.parallel=fsdp2 does not support LoRA (lora.rank > 0); use "
                "parallel=ddp, whose replicated adapters and optimizer state are small"
            )
        self.resolved_options()

    def resolved_options(self) -> AlgorithmOptions:
        """The preset's options with this config's overrides applied (every field set)."""
        preset = get_preset(self.algorithm)
        return resolve(preset.options, self.options, self.algorithm)
