"""Building what a Learner trains and scores with, from its config and algorithm options.

The policy (with LoRA adapters and activation checkpointing when asked), the reference
policy for a KL term (none with LoRA: the same model with its adapters off), the critic
(a value head on the policy, or a separate model), and a teacher (a model of the same
tokenizer, or the tokenizer that renders privileged context for the base model). Under
FSDP2 :func:`fully_shard` shards the trained modules block by block.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from taurl.errors import ConfigError
from taurl.learners.config import LearnerConfig
from taurl.learners.model import (
    ValueModel,
    add_lora,
    load_causal_lm,
    new_value_head,
    policy_forward,
)
from taurl.learners.options import AlgorithmOptions
from taurl.learners.teacher import check_same_tokenizer, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Modules:
    """What :func:`modules` built; None where the algorithm does not need it."""

    policy: nn.Module  # the trained policy (a peft model with LoRA)
    ref_model: nn.Module | None  # a frozen copy for the KL term (full fine-tuning only)
    value_head: nn.Module | None  # critic = head
    critic: ValueModel | None  # critic = model
    teacher_model: nn.Module | None  # teacher = model
    tokenizer: PreTrainedTokenizerBase | None  # teacher = privileged: renders the context


def modules(config: LearnerConfig, o: AlgorithmOptions, model_path: str | Path,
            device: torch.device) -> Modules:
    """Load and prepare every module ``config`` and the resolved options ``o`` call for."""
    model_path = str(model_path)
    policy = load_causal_lm(model_path, device)
    hidden_size = policy.config.hidden_size
    needs_base = o.kl_coef > 0 or o.teacher == "privileged"
    # With LoRA the reference is the same model with its adapters off: no copy.
    ref_model = None
    if needs_base and not config.lora.rank:
        ref_model = copy.deepcopy(policy).requires_grad_(False).eval()
    if config.lora.rank:
        policy = add_lora(policy, config.lora)
    if config.gradient_checkpointing:
        base = policy.get_base_model() if config.lora.rank else policy
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    value_head = new_value_head(hidden_size, device) if o.critic == "head" else None
    critic = ValueModel(o.critic_path or model_path, device) if o.critic == "model" else None
    teacher_model = None
    if o.teacher == "model":
        check_same_tokenizer(load_tokenizer(model_path), load_tokenizer(o.teacher_path),
                             model_path, o.teacher_path)
        teacher_model = load_causal_lm(o.teacher_path, device).requires_grad_(False).eval()
    tokenizer = load_tokenizer(model_path) if o.teacher == "privileged" else None
    return Modules(policy, ref_model, value_head, critic, teacher_model, tokenizer)


class TrainedModules(nn.Module):
    """The modules the optimizer trains, as one module: what DDP wraps and FSDP2 shards.

    Its ``forward`` is the whole training forward, so that DDP's and FSDP2's hooks see
    every trained parameter used (calling submodules directly would bypass them). The
    submodules are named ``policy``, ``value_head`` and ``critic``: checkpoint keys.
    """

    def __init__(self, policy: nn.Module, value_head: nn.Module | None,
                 critic: ValueModel | None, share_prefix: bool = True) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.critic = critic
        self.share_prefix = share_prefix  # run a prompt the rows share once (policy_forward)

    def forward(
        self, input_ids_B_T: torch.Tensor, mask_B_T: torch.Tensor, chunk_tokens: int,
        entropy_grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(logp_B_T, entropy_B_T, values_B_T | None)``, float32, as :func:`policy_forward`."""
        out = policy_forward(self.policy, input_ids_B_T, mask_B_T, chunk_tokens,
                             self.value_head, entropy_grad=entropy_grad,
                             share_prefix=self.share_prefix)
        values = self.critic(input_ids_B_T) if self.critic is not None else out.values_B_T
        return out.logp_B_T, out.entropy_B_T, values


def fully_shard(policy: nn.Module, trained: TrainedModules, device: torch.device,
                world_size: int) -> None:
    """FSDP2: shard each transformer block (policy and critic), then the rest as the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard as shard

    blocks = set(getattr(policy, "_no_split_modules", None) or ())
    if not blocks:
        raise ConfigError(
            f"learner.parallel=fsdp2 shards a model block by block, but "
            f"{type(policy).__name__} names no blocks (_no_split_modules); use "
            "parallel=ddp for this model"
        )
    mesh = init_device_mesh(device.type, (world_size,))
    for module in list(trained.modules()):
        if type(module).__name__ in blocks:
            shard(module, mesh=mesh)
    shard(trained, mesh=mesh)
