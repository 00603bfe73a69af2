"""The update step: trajectories in, one or more optimizer steps out, metrics back.

::

    learner = Learner(LearnerConfig(algorithm="grpo"), model_folder)
    metrics = learner.update(trajectories)        # {"traj/clip_frac": ..., "reward/mean": ...}
    backend.update_weights(learner.state_dict_for_sync(), learner.policy_version)

One update: (1) if needed, score every trajectory once without gradient — the
learner's own log-probs under the current weights, the critic's values, the
reference policy and the teacher; (2) turn rewards into per-token advantages (the
reward side, :mod:`taurl.learners.advantages`); (3) run ``epochs`` passes of
``minibatches`` optimizer steps, each accumulating gradients over micro-batches
packed by a token budget, with the policy loss (the trajectory side,
:mod:`taurl.learners.losses`) normalised by the whole minibatch.

When the algorithm takes a single step per batch and nothing else needs it, step
(1) is skipped: the ratio's denominator is the training forward's own log-prob,
detached, which is the same number (θ_old = θ before the only step).

One home each: the modules are built in :mod:`~taurl.learners.build`, the batch is
scored in :mod:`~taurl.learners.scoring`, the reward side is composed in
:mod:`~taurl.learners.reward_side`, checkpoints are written and read by
:mod:`~taurl.learners.checkpoint`, micro-batches are sharded over ranks by
:mod:`~taurl.learners.distributed`; this module holds the update loop.

Under ``torchrun`` with N processes (:mod:`taurl.learners.distributed`) every rank
gets the same whole batch: advantages and the loss normalisers are the whole
batch's, as alone, but each rank scores and back-propagates only its shard of the
rows (:func:`~taurl.learners.distributed.shard_rows`). The trained modules are
wrapped with DDP (``parallel: ddp``) or sharded with FSDP2 (``parallel: fsdp2``);
both average gradients over ranks, so each rank's loss is scaled by N and the sum of
the shards' gradients is exactly the one-process gradient. Metrics are reduced over
the ranks, so every rank returns the whole batch's.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from taurl.learners import advantages as A
from taurl.learners import build, checkpoint, scoring
from taurl.learners import distributed as D
from taurl.learners import losses as L
from taurl.learners import reward_side as R
from taurl.learners.batch import Batch, Denominators, build_batch, split_minibatches
from taurl.learners.config import LearnerConfig
from taurl.learners.model import (
    autocast,
    export_state_dict,
    keep_freed_memory,
    pick_autocast_dtype,
    pick_device,
)
from taurl.types import Trajectory


class Learner:
    """Updates a causal LM policy from Trajectories with one algorithm preset.

    Under ``torchrun`` every rank builds one with the same config and calls the same
    methods in the same order: :meth:`update` with the same trajectories,
    :meth:`state_dict_for_sync`, :meth:`save` and :meth:`load` (collectives under
    FSDP2; only rank 0 gets weights and writes files).
    """

    def __init__(self, config: LearnerConfig, model_path: str | Path) -> None:
        self.config = config
        self.options = o = config.resolved_options()
        self.model_path = str(model_path)
        D.init_process_group()
        self.world_size, self.rank = D.world_size(), D.rank()
        self.parallel = config.parallel if self.world_size > 1 else "none"
        self.device = D.local_device(pick_device(config.device))
        self.amp_dtype = pick_autocast_dtype(config.dtype, self.device)
        if self.device.type == "cpu" and config.cpu_keep_freed_memory:
            keep_freed_memory()
        self.policy_version = 0  # optimizer steps taken: the version the weights sync as
        self._shuffle = torch.Generator().manual_seed(config.seed)
        self.estimator = A.get_estimator(o.advantage)
        self.policy_loss = L.get_policy_loss(o.policy_loss)
        self.adv_params = A.AdvantageParams(
            gamma=o.gamma, lam=o.lam, gamma_turn=o.gamma_turn, credit=o.credit,
            scale=o.group_scale,
        )
        self.loss_params = L.PolicyLossParams(o.eps_low, o.eps_high, o.dual_clip)

        built = build.modules(config, o, self.model_path, self.device)
        self.model, self.ref_model = built.policy, built.ref_model
        self.value_head, self.critic = built.value_head, built.critic
        self.teacher_model, self.tokenizer = built.teacher_model, built.tokenizer
        self.trained_modules = build.TrainedModules(self.model, self.value_head, self.critic,
                                                   config.share_prefix)
        # The module the training forward runs through: DDP's wrapper, or the modules
        # themselves (alone, or sharded in place by FSDP2). Scoring never needs DDP.
        self._train_forward: nn.Module = self.trained_modules
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            gpu = [self.device.index] if self.device.type == "cuda" else None
            self._train_forward = DistributedDataParallel(self.trained_modules, device_ids=gpu,
                                                          forward_sync_buffers=False)
        elif self.parallel == "fsdp2":
            build.fully_shard(self.model, self.trained_modules, self.device, self.world_size)
        critic_params = [p for m in (self.value_head, self.critic) if m is not None
                         for p in m.parameters()]
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad],
                   "lr": config.lr}]
        if critic_params:
            groups.append({"params": critic_params, "lr": config.critic_lr})
        self.optimizer = torch.optim.AdamW(
            groups, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay, fused=True,
        )

    # -- public API ---------------------------------------------------------------------

    def update(self, trajectories: list[Trajectory]) -> dict[str, float]:
        """Learn from one batch of trajectories; return metrics.

        Keys: ``reward/...`` and ``adv/...`` for the reward side, ``traj/...`` for the
        trajectory side, ``perf/...`` for throughput. ``policy_version`` grows by the
        number of optimizer steps taken (0 when every group was filtered out).
        """
        start = time.perf_counter()
        o = self.options
        trajs = list(trajectories)
        metrics, zero_var = R.reward_metrics(trajs)
        if o.filter_zero_var_groups and trajs:
            trajs = [t for t, drop in zip(trajs, zero_var.tolist(), strict=True) if not drop]
            metrics["reward/filtered_frac"] = 1.0 - len(trajs) / max(len(trajectories), 1)
        if not trajs:
            metrics["perf/optimizer_steps"] = 0.0
            return metrics
        batch = build_batch(trajs, self.device)
        steps = o.epochs * min(o.minibatches, batch.size)
        targets, reward_side = self._targets(batch, trajs, need_old=steps > 1)
        metrics.update(reward_side)

        acc = D.MetricSums(self.device)
        lengths = batch.lengths_B.tolist()
        grad_norms = []
        for _ in range(o.epochs):
            order = torch.randperm(batch.size, generator=self._shuffle).tolist()
            for rows in split_minibatches(order, o.minibatches):
                grad_norms.append(self._step(batch, rows, lengths, targets, acc))
        metrics.update(acc.means())
        # every rank clips the same (reduced) gradient: its norm is already the batch's
        metrics["traj/grad_norm"] = torch.stack(grad_norms).mean().item()
        elapsed = time.perf_counter() - start
        tokens = int(batch.lengths_B.sum().item())
        metrics.update({
            "perf/update_s": elapsed,
            "perf/tokens": float(tokens),
            "perf/tokens_per_s": tokens * o.epochs / elapsed,
            "perf/optimizer_steps": float(steps),
        })
        return metrics

    def backward(self, trajectories: list[Trajectory]) -> dict[str, float]:
        """Accumulate the gradient of one minibatch made of every trajectory, no optimizer step.

        The gradient :meth:`update` would step with (first epoch, one minibatch), left in
        the parameters' ``.grad``: for gradient checks and tests. Returns the metrics.
        """
        batch = build_batch(list(trajectories), self.device)
        targets, _ = self._targets(batch, list(trajectories), need_old=False)
        self.trained_modules.train()
        self.optimizer.zero_grad(set_to_none=True)
        acc = D.MetricSums(self.device)
        self._backward_minibatch(batch, list(range(batch.size)), batch.lengths_B.tolist(),
                                 targets, acc)
        return acc.means()

    def state_dict_for_sync(self, dtype: torch.dtype | None = None,
                            copy: bool = True) -> dict[str, torch.Tensor]:
        """The policy's weights under Hugging Face names (LoRA merged), for the inference engine.

        ``dtype`` converts them (e.g. ``torch.bfloat16`` for a bf16 engine); tied
        weights appear once. ``copy=False`` may return the parameters themselves (detached)
        where no conversion is needed: for a caller done with them before the next update
        (``InferenceBackend.update_weights`` copies what it keeps). Under torchrun every
        rank calls it (FSDP2 gathers the shards) and ranks other than 0 get ``{}``.
        """
        if self.parallel != "fsdp2":
            return export_state_dict(self.model, dtype, copy) if D.is_main() else {}
        full = D.full_state_dict(self.trained_modules)
        if not D.is_main():
            return {}
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for k, v in full.items():
            if k.startswith("policy.") and id(v) not in seen:  # tied weights: once
                seen.add(id(v))
                out[k.removeprefix("policy.")] = v.to(dtype=dtype or v.dtype).clone()
        return out

    def save(self, directory: str | Path) -> None:
        """Write a checkpoint: weights (safetensors), optimizer, RNG states and step.

        Under torchrun every rank calls it (FSDP2 gathers the shards); rank 0 writes,
        in the same format as a single process (a checkpoint resumes with any number
        of processes), and every rank returns once the files are complete.
        """
        checkpoint.save(self, Path(directory))

    def load(self, directory: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save` with the same config."""
        checkpoint.load(self, Path(directory))

    # -- one update ---------------------------------------------------------------------

    def _targets(self, batch: Batch, trajs: list[Trajectory],
                 need_old: bool) -> tuple[R.UpdateTargets, dict[str, float]]:
        """Score the batch if anything needs it, then run the reward side (:mod:`reward_side`)."""
        o = self.options
        need_old = need_old or o.teacher != "none" or (o.kl_coef > 0 and o.kl_in == "reward")
        scores = scoring.score(self, batch, trajs, need_old=need_old)
        return R.compute(batch, scores, o, self.estimator, self.adv_params)

    # -- trajectory side: one optimizer step --------------------------------------------

    def _step(self, batch: Batch, rows: list[int], lengths: list[int], targets: R.UpdateTargets,
              acc: D.MetricSums) -> torch.Tensor:
        """Accumulate the minibatch ``rows`` over micro-batches, clip, and take one AdamW step.

        Returns the gradient norm before clipping (float32 scalar).
        """
        self.trained_modules.train()
        self.optimizer.zero_grad(set_to_none=True)
        self._backward_minibatch(batch, rows, lengths, targets, acc)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = nn.utils.clip_grad_norm_(params, self.config.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.policy_version += 1
        return D.plain(grad_norm).detach().float()

    def _backward_minibatch(self, batch: Batch, rows: list[int], lengths: list[int],
                            targets: R.UpdateTargets, acc: D.MetricSums) -> None:
        """Backward the minibatch's loss, micro-batch by micro-batch, normalised globally."""
        o, cfg = self.options, self.config
        denom = Denominators.of(batch, rows, o.loss_norm_len, targets.value_mask_B_T)
        run = self._rows_with_gradient(batch, rows, targets)
        if run is None:
            run = rows
        else:  # every minibatch reports it, so that its mean is over them all
            kept = batch.mask_B_T[batch.rows(run)].sum() if run else 0.0
            acc.add({"traj/zero_grad_frac": torch.as_tensor(1.0 - kept / max(denom.num_tokens, 1))},
                    1.0, True)
        if not run:
            # the whole minibatch's gradient is 0: AdamW still steps with it (moments, decay)
            for p in (p for g in self.optimizer.param_groups for p in g["params"]):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            return
        micros = self.micro_batches(run, lengths, lockstep=True,
                                    groups=batch.group_ids_B.tolist())
        for i, (micro, real) in enumerate(micros):
            idx, W = batch.rows(micro), batch.width(micro)
            ids, mask = batch.input_ids_B_T[idx, :W], batch.mask_B_T[idx, :W]
            with D.grad_sync(self.parallel, self._train_forward, self.trained_modules,
                             last=i == len(micros) - 1):
                with autocast(self.device, self.amp_dtype):
                    logp, entropy, values = self._train_forward(
                        ids, mask, cfg.logprob_chunk_tokens, o.entropy_coef > 0)
                loss, m = self._micro_loss(batch, idx, W, (logp, entropy, values), targets, denom)
                # DDP and FSDP2 average over ranks: × N makes it the sum of the shards'
                # gradients. A placeholder (× 0) only keeps the ranks' collectives in step.
                scale = float(self.world_size) if real else 0.0
                (loss * scale if scale != 1.0 else loss).backward()
            m["traj/entropy"] = L.masked_mean(entropy.detach(), mask)
            acc.add(m, float(mask.sum().item()) if real else 0.0, real)

    def _rows_with_gradient(self, batch: Batch, rows: list[int],
                            targets: R.UpdateTargets) -> list[int] | None:
        """``rows`` less those whose loss adds exactly 0 to the gradient (``skip_zero_grad_rows``),
        or None when no row can be skipped (off, or a loss term without the advantage).

        A row qualifies when the advantage of every sampled token is 0 (a GRPO group whose
        samples all scored the same) and the loss has no term without the advantage: a
        policy loss of :data:`~taurl.learners.losses.ZERO_AT_ZERO_ADVANTAGE`, no entropy
        bonus, no KL penalty in the loss, no value loss. The loss's normalisers stay the
        whole minibatch's, so the update is the one every row would give.
        """
        o = self.options
        if (not self.config.skip_zero_grad_rows or o.policy_loss not in L.ZERO_AT_ZERO_ADVANTAGE
                or o.entropy_coef > 0 or (o.kl_coef > 0 and o.kl_in == "loss")
                or targets.returns_B_T is not None):
            return None
        idx = batch.rows(rows)
        live = ((targets.advantages_B_T[idx] != 0) & (batch.mask_B_T[idx] > 0)).any(1).tolist()
        return [r for r, keep in zip(rows, live, strict=True) if keep]

    def _micro_loss(
        self, batch: Batch, idx: torch.Tensor, W: int,
        forward: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], targets: R.UpdateTargets,
        denom: Denominators,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch's share of the minibatch loss (global denominators) and its metrics.

        ``forward``: the training forward's ``(logp, entropy, values)`` on rows ``idx``.
        """
        o, scores = self.options, targets.scores
        logp, entropy, values = forward
        mask = batch.mask_B_T[idx, :W]
        old = scores.old_logp[idx, :W] if scores.old_logp is not None else logp.detach()
        w, m = L.tis_weights(old, batch.sampler_logp_B_T[idx, :W], mask, o.tis_cap)
        pg, pg_m = self.policy_loss(logp, old, targets.advantages_B_T[idx, :W], mask,
                                    self.loss_params)
        m.update(pg_m)
        per_token = pg * w
        if o.kl_coef > 0 and o.kl_in == "loss":
            kl = L.kl_penalty(logp, scores.ref_logp[idx, :W], mask, o.kl_estimator)
            per_token = per_token + o.kl_coef * kl
            m["traj/kl_ref"] = L.masked_mean(kl.detach(), mask)
        if o.entropy_coef > 0:
            per_token = per_token - o.entropy_coef * entropy
        loss = L.aggregate(per_token, mask, o.loss_agg, denom.num_tokens, denom.num_seqs,
                           denom.norm_len)
        m["traj/policy_loss"] = loss.detach() * denom.num_tokens / max(mask.sum().item(), 1)
        returns, value_mask = targets.returns_B_T, targets.value_mask_B_T
        if values is not None and returns is not None and value_mask is not None:
            vmask = value_mask[idx, :W]
            vl, vm = L.value_loss(values, scores.values[idx, :W], returns[idx, :W], vmask,
                                  o.value_clip)
            loss = loss + o.vf_coef * L.aggregate(vl, vmask, "token-mean", denom.num_value, 1, 1)
            m.update(vm)
        return loss, m

    # -- data parallelism (torchrun) ----------------------------------------------------

    def micro_batches(self, rows: list[int], widths: list[int], lockstep: bool,
                      groups: list[int] | None = None) -> list[tuple[list[int], bool]]:
        """This rank's micro-batches of ``rows`` (see :func:`distributed.micro_batches`).

        ``groups`` (every row's group id) keeps a group's rows, which share a prompt,
        together when ``share_prefix`` is on.
        """
        return D.micro_batches(rows, widths, self.config.micro_batch_tokens, self.parallel,
                               lockstep, groups if self.config.share_prefix else None)
