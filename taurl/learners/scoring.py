"""The no-gradient scoring pass of an update: what the reward side and the loss compare to.

Before the optimizer steps, the batch may need scoring under frozen weights: the
learner's own log-probs (θ_old, the ratio's denominator when a batch takes several
steps), the critic's values, the reference policy (KL) and the teacher (on-policy
distillation; a privileged teacher is the base model with extra context). Each rank
scores its shard of the rows and a sum over ranks fills the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from taurl.learners import distributed as D
from taurl.learners.batch import TEACHER_LOGPROBS_KEY, Batch, info_tensor
from taurl.learners.model import adapter_disabled, autocast, policy_forward
from taurl.learners.teacher import (
    align_to_student,
    privileged_contexts,
    privileged_prefix,
    teacher_rows,
)
from taurl.types import Trajectory

if TYPE_CHECKING:
    from taurl.learners.learner import Learner


@dataclass
class Scores:
    """What the no-gradient scoring pass produced, each float32 [B, T] or None."""

    old_logp: torch.Tensor | None = None  # the learner's log-probs before the update
    values: torch.Tensor | None = None  # the critic's values
    ref_logp: torch.Tensor | None = None  # the reference policy's log-probs
    teacher_logp: torch.Tensor | None = None  # the teacher's log-probs


@torch.no_grad()
def score(learner: Learner, batch: Batch, trajs: list[Trajectory], need_old: bool) -> Scores:
    """Score ``batch`` under the learner's current (frozen) modules; empty when nothing needs it.

    ``need_old``: the learner's own log-probs are needed (several optimizer steps on one
    batch, a teacher or KL-in-reward); the critic's values come with them.
    """
    o, cfg, device = learner.options, learner.config, learner.device
    need_ref = o.kl_coef > 0
    B, T = batch.input_ids_B_T.shape
    s = Scores()
    if not (need_old or need_ref or o.critic != "none" or o.teacher != "none"):
        return s

    def zeros() -> torch.Tensor:
        return torch.zeros(B, T, device=device)

    s.old_logp = zeros() if need_old or o.critic != "none" else None
    s.values = zeros() if o.critic != "none" else None
    s.ref_logp = zeros() if need_ref else None
    if o.teacher == "precomputed":
        s.teacher_logp = info_tensor(trajs, TEACHER_LOGPROBS_KEY, T, device)
    elif o.teacher != "none":
        s.teacher_logp = zeros()
    learner.trained_modules.eval()
    # Each rank scores its shard; the rows it did not score stay 0 and the sum over
    # ranks below fills them. FSDP2 needs every rank in every policy forward.
    micros = learner.micro_batches(
        list(range(B)), batch.lengths_B.tolist(),
        lockstep=learner.parallel == "fsdp2" and s.old_logp is not None,
        groups=batch.group_ids_B.tolist())
    for micro, real in micros:
        idx, W = batch.rows(micro), batch.width(micro)
        ids, mask = batch.input_ids_B_T[idx, :W], batch.mask_B_T[idx, :W]
        with autocast(device, learner.amp_dtype):
            if s.old_logp is not None:
                logp, _, values = learner.trained_modules(ids, mask, cfg.logprob_chunk_tokens)
                if real:
                    s.old_logp[idx, :W] = logp
                if real and values is not None:
                    s.values[idx, :W] = values
            if not real:
                continue
            if s.ref_logp is not None:
                with adapter_disabled(learner.model):
                    ref = learner.ref_model or learner.model
                    s.ref_logp[idx, :W] = policy_forward(
                        ref, ids, mask, cfg.logprob_chunk_tokens,
                        share_prefix=cfg.share_prefix).logp_B_T
            if learner.teacher_model is not None:
                s.teacher_logp[idx, :W] = policy_forward(
                    learner.teacher_model, ids, mask, cfg.logprob_chunk_tokens,
                    share_prefix=cfg.share_prefix).logp_B_T
    for t in (s.old_logp, s.values, s.ref_logp):
        if t is not None:
            D.all_reduce_(t)
    if learner.teacher_model is not None:
        D.all_reduce_(s.teacher_logp)
    if o.teacher == "privileged":
        s.teacher_logp = privileged_logprobs(learner, batch, trajs)
    return s


@torch.no_grad()
def privileged_logprobs(learner: Learner, batch: Batch, trajs: list[Trajectory]) -> torch.Tensor:
    """float32 [B, T]: the frozen base model's log-probs with each trajectory's context."""
    device = learner.device
    prefixes = [privileged_prefix(learner.tokenizer, c) for c in privileged_contexts(trajs)]
    rows, offsets = teacher_rows(batch.token_ids, prefixes)
    widths = [len(r) for r in rows]
    L_max = max(widths)
    ids = torch.zeros(len(rows), L_max, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), L_max, device=device)
    for b, (row, off) in enumerate(zip(rows, offsets, strict=True)):
        ids[b, : len(row)] = torch.tensor(row, device=device)
        n = int(batch.lengths_B[b])
        mask[b, off : off + n] = batch.mask_B_T[b, :n]
    out = torch.zeros(len(rows), L_max, device=device)
    base = learner.ref_model or learner.model  # never sharded: no lockstep needed
    for micro, _ in learner.micro_batches(list(range(len(rows))), widths, lockstep=False):
        idx = torch.tensor(micro, device=device)
        W = max(widths[i] for i in micro)
        with autocast(device, learner.amp_dtype), adapter_disabled(learner.model):
            out[idx, :W] = policy_forward(base, ids[idx, :W], mask[idx, :W],
                                          learner.config.logprob_chunk_tokens).logp_B_T
    return align_to_student(D.all_reduce_(out), offsets, batch.input_ids_B_T.shape[1])
