"""Trajectories → padded tensors, and the split of a batch into minibatches and micro-batches.

Rows are right-padded. Because attention is causal, a real token never attends to
the padding after it, so no attention mask is needed and every real token sees
exactly the context it was sampled in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from taurl.errors import TrajectoryError
from taurl.types import Trajectory

#: Trajectory.info key of the teacher's log-probs computed elsewhere (e.g. by vLLM with
#: prompt logprobs): a list of T floats aligned with token_ids, read when teacher=precomputed.
TEACHER_LOGPROBS_KEY = "teacher_logprobs"
#: Trajectory.info key of the privileged context (a str) for teacher=privileged.
PRIVILEGED_CONTEXT_KEY = "privileged_context"


@dataclass
class Batch:
    """A batch of B trajectories as tensors on one device (T = longest, H = most turns)."""

    input_ids_B_T: torch.Tensor  # int64 [B, T], right-padded with 0
    lengths_B: torch.Tensor  # int64 [B], real length of each row
    mask_B_T: torch.Tensor  # float32 [B, T], 1 on sampled tokens
    sampler_logp_B_T: torch.Tensor  # float32 [B, T], Trajectory.logprobs
    turn_ids_B_T: torch.Tensor  # int64 [B, T], -1 for the prompt and padding
    turn_rewards_B_H: torch.Tensor  # float32 [B, H]
    turn_valid_B_H: torch.Tensor  # float32 [B, H], 1 on real turns
    group_ids_B: torch.Tensor  # int64 [B]
    anchor_ids_B_H: torch.Tensor  # int64 [B, H], step group of each turn, -1 on padding turns
    token_ids: list[list[int]]  # the unpadded rows, for building teacher inputs

    @property
    def size(self) -> int:
        """Number of trajectories B."""
        return self.input_ids_B_T.shape[0]

    def rows(self, idx: list[int]) -> torch.Tensor:
        """int64 [len(idx)]: an index tensor on the batch's device."""
        return torch.tensor(idx, dtype=torch.long, device=self.input_ids_B_T.device)

    def width(self, idx: list[int]) -> int:
        """Longest real length among rows ``idx`` (the micro-batch's padded length)."""
        return max(int(self.lengths_B[i]) for i in idx)


def group_ids(trajectories: list[Trajectory]) -> list[int]:
    """Equal non-empty group_id → equal int; an empty group_id is a group of its own."""
    ids: dict[str, int] = {}
    out = []
    for i, traj in enumerate(trajectories):
        key = traj.group_id if traj.group_id else f"\0ungrouped-{i}"
        out.append(ids.setdefault(key, len(ids)))
    return out


def anchor_keys(traj: Trajectory) -> list[tuple[int, ...]]:
    """Per turn h, the observation so far: the non-sampled tokens before turn h's first token.

    Two turns of one group with the same key faced the same prompt and received the
    same environment observations, whatever words their actions used: GiGPO's
    "anchor state" for text environments.
    """
    keys: list[tuple[int, ...]] = []
    seen: list[int] = []
    for tok, m, turn in zip(traj.token_ids, traj.loss_mask, traj.turn_ids, strict=True):
        if m == 1 and turn == len(keys):
            keys.append(tuple(seen))
        if m == 0:
            seen.append(tok)
    return keys


def build_batch(trajectories: list[Trajectory], device: torch.device) -> Batch:
    """Pad ``trajectories`` into a :class:`Batch` on ``device``.

    Raises TrajectoryError when a trajectory has no sampled token to learn from or
    starts with a sampled token (its first token has no context to predict it from).
    """
    if not trajectories:
        raise TrajectoryError("the learner got an empty batch; pass at least one trajectory")
    B = len(trajectories)
    T = max(len(t.token_ids) for t in trajectories)
    H = max(max(t.num_turns for t in trajectories), 1)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T)
    slp = torch.zeros(B, T)
    turns = torch.full((B, T), -1, dtype=torch.long)
    rewards = torch.zeros(B, H)
    valid = torch.zeros(B, H)
    anchors = torch.full((B, H), -1, dtype=torch.long)
    groups = group_ids(trajectories)
    anchor_index: dict[tuple[int, int, tuple[int, ...]], int] = {}
    for b, traj in enumerate(trajectories):
        n = len(traj.token_ids)
        if traj.loss_mask and traj.loss_mask[0] == 1:
            raise TrajectoryError(
                f"trajectory {b} (task {traj.task_id!r}) starts with a sampled token; the first "
                "token has no context, so a trajectory must start with its prompt"
            )
        ids[b, :n] = torch.tensor(traj.token_ids, dtype=torch.long)
        mask[b, :n] = torch.tensor(traj.loss_mask, dtype=torch.float32)
        slp[b, :n] = torch.tensor(traj.logprobs, dtype=torch.float32)
        turns[b, :n] = torch.tensor(traj.turn_ids, dtype=torch.long)
        rewards[b, : traj.num_turns] = torch.tensor(traj.rewards, dtype=torch.float32)
        valid[b, : traj.num_turns] = 1.0
        for h, key in enumerate(anchor_keys(traj)):
            anchors[b, h] = anchor_index.setdefault((groups[b], h, key), len(anchor_index))
    return Batch(
        input_ids_B_T=ids.to(device),
        lengths_B=torch.tensor([len(t.token_ids) for t in trajectories], device=device),
        mask_B_T=mask.to(device),
        sampler_logp_B_T=slp.to(device),
        turn_ids_B_T=turns.to(device),
        turn_rewards_B_H=rewards.to(device),
        turn_valid_B_H=valid.to(device),
        group_ids_B=torch.tensor(groups, dtype=torch.long, device=device),
        anchor_ids_B_H=anchors.to(device),
        token_ids=[list(t.token_ids) for t in trajectories],
    )


def info_tensor(
    trajectories: list[Trajectory], key: str, T: int, device: torch.device
) -> torch.Tensor:
    """float32 [B, T] from a per-token list ``info[key]`` of each trajectory (0-padded).

    Raises TrajectoryError naming the trajectory when the list is missing or has the
    wrong length.
    """
    out = torch.zeros(len(trajectories), T)
    for b, traj in enumerate(trajectories):
        values = traj.info.get(key)
        if not isinstance(values, list) or len(values) != len(traj.token_ids):
            got = f"a list of {len(values)}" if isinstance(values, list) else repr(type(values))
            raise TrajectoryError(
                f"trajectory {b} (task {traj.task_id!r}): info[{key!r}] must be a list of "
                f"{len(traj.token_ids)} floats aligned with token_ids, got {got}; fill it with "
                "the teacher's log-prob of each token (prompt logprobs), 0.0 off sampled tokens"
            )
        out[b, : len(values)] = torch.tensor([float(v) for v in values])  # type: ignore[arg-type]
    return out.to(device)


def split_minibatches(order: list[int], n: int) -> list[list[int]]:
    """Split row indices ``order`` into ``min(n, len(order))`` near-equal consecutive parts."""
    n = max(1, min(n, len(order)))
    size, extra = divmod(len(order), n)
    parts, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        parts.append(order[start:end])
        start = end
    return parts


def pack_micro_batches(rows: list[int], lengths: list[int], budget: int,
                       groups: list[int] | None = None) -> list[list[int]]:
    """Group ``rows`` into micro-batches of at most ``budget`` padded tokens each.

    Rows are sorted by length (longest first) so that rows of similar length share a
    micro-batch and little compute goes to padding; a micro-batch costs
    ``len(rows) × longest row`` tokens. A single row longer than the budget gets a
    micro-batch of its own. With ``groups``, rows are kept together by group first (a
    group's rows share their prompt, which then runs once per micro-batch:
    ``learner.share_prefix``), longest first within a group.

    Args:
        rows: row indices into the batch.
        lengths: real length of every row of the batch (indexed by row).
        budget: padded tokens per micro-batch.
        groups: group id of every row of the batch (indexed by row), or None.
    """
    if groups is None:
        ordered = sorted(rows, key=lambda r: (-lengths[r], r))
    else:
        ordered = sorted(rows, key=lambda r: (groups[r], -lengths[r], r))
    out: list[list[int]] = []
    current: list[int] = []
    for r in ordered:
        width = max([lengths[r]] + [lengths[c] for c in current])
        if current and (len(current) + 1) * width > budget:
            out.append(current)
            current = []
        current.append(r)
    if current:
        out.append(current)
    return out


def global_denominators(batch: Batch, rows: list[int], norm_len: int) -> tuple[int, int, int]:
    """``(num_tokens, num_seqs, norm_len)`` of a minibatch, for :func:`losses.aggregate`.

    ``norm_len`` 0 becomes the largest number of sampled tokens in any row.
    """
    per_row = batch.mask_B_T[batch.rows(rows)].sum(1)
    num_tokens = int(per_row.sum().item())
    num_seqs = int((per_row > 0).sum().item())
    longest = math.ceil(per_row.max().item()) if rows else 1
    return num_tokens, num_seqs, max(norm_len or longest, 1)


@dataclass(frozen=True)
class Denominators:
    """A minibatch's global loss normalisers: every micro-batch divides by these."""

    num_tokens: int  # sampled tokens
    num_seqs: int  # rows with a sampled token
    norm_len: int  # seq-mean-token-sum-norm's constant length
    num_value: int  # positions where the value loss applies

    @classmethod
    def of(cls, batch: Batch, rows: list[int], norm_len: int,
           value_mask_B_T: torch.Tensor | None) -> Denominators:
        """The normalisers of minibatch ``rows`` (``value_mask_B_T``: None without a critic)."""
        num_value = 0
        if value_mask_B_T is not None:
            num_value = int(value_mask_B_T[batch.rows(rows)].sum().item())
        return cls(*global_denominators(batch, rows, norm_len), num_value)
