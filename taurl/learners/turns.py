"""Placing turn-level quantities on tokens, and reading them back.

A trajectory's tokens carry the turn they belong to (``turn_ids_B_T``: -1 for the
prompt, h for turn h, observation tokens included) and the loss mask (``mask_B_T``:
1 on the tokens the policy sampled). Rewards arrive per turn (``[B, H]``); advantages
and losses live on tokens (``[B, T]``). These pure functions move values between the
two: a turn's reward lands on its last sampled token, its state is read at its first
sampled token, and a per-turn value is spread over all of its sampled tokens.
"""

from __future__ import annotations

import torch


def broadcast_turns(
    x_B_H: torch.Tensor, turn_ids_B_T: torch.Tensor, mask_B_T: torch.Tensor
) -> torch.Tensor:
    """Give every sampled token of turn h the value ``x[b, h]``.

    Args:
        x_B_H: float [B, H].
        turn_ids_B_T: int [B, T], the turn of each token (-1 for the prompt).
        mask_B_T: 0/1 [B, T], sampled tokens.

    Returns:
        float [B, T], 0 where mask is 0.
    """
    idx = turn_ids_B_T.clamp(min=0, max=max(x_B_H.shape[1] - 1, 0)).long()
    return x_B_H.gather(1, idx) * mask_B_T.to(x_B_H.dtype)


def _turn_edge(turn_ids_B_T: torch.Tensor, mask_B_T: torch.Tensor, first: bool) -> torch.Tensor:
    """0/1 [B, T]: 1 on the first (``first``) or last sampled token of each turn.

    A sampled token is a turn's first (last) when the token before (after) it is not a
    sampled token of the same turn.
    """
    m = mask_B_T > 0
    neighbour_turn = torch.full_like(turn_ids_B_T, -2)
    neighbour_m = torch.zeros_like(m)
    if first:
        neighbour_turn[:, 1:], neighbour_m[:, 1:] = turn_ids_B_T[:, :-1], m[:, :-1]
    else:
        neighbour_turn[:, :-1], neighbour_m[:, :-1] = turn_ids_B_T[:, 1:], m[:, 1:]
    return (m & ~(neighbour_m & (neighbour_turn == turn_ids_B_T))).to(mask_B_T.dtype)


def turn_start_mask(turn_ids_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """0/1 [B, T]: 1 on the first sampled token of each turn (where the turn's state is).

    Args:
        turn_ids_B_T: int [B, T].
        mask_B_T: 0/1 [B, T], sampled tokens.
    """
    return _turn_edge(turn_ids_B_T, mask_B_T, first=True)


def turn_end_mask(turn_ids_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """0/1 [B, T]: 1 on the last sampled token of each turn (where the turn's reward lands).

    Args:
        turn_ids_B_T: int [B, T].
        mask_B_T: 0/1 [B, T], sampled tokens.
    """
    return _turn_edge(turn_ids_B_T, mask_B_T, first=False)


def gather_turn_starts(
    x_B_T: torch.Tensor, turn_ids_B_T: torch.Tensor, mask_B_T: torch.Tensor, num_turns: int
) -> torch.Tensor:
    """float [B, H]: ``x`` read at the first sampled token of each turn (0 for absent turns).

    Args:
        x_B_T: float [B, T], e.g. per-token values.
        turn_ids_B_T: int [B, T].
        mask_B_T: 0/1 [B, T], sampled tokens.
        num_turns: H.
    """
    starts = turn_start_mask(turn_ids_B_T, mask_B_T) > 0
    out = x_B_T.new_zeros(x_B_T.shape[0], num_turns)
    b, t = starts.nonzero(as_tuple=True)
    out[b, turn_ids_B_T[b, t].long()] = x_B_T[b, t]
    return out


def turn_sums(
    x_B_T: torch.Tensor, turn_ids_B_T: torch.Tensor, mask_B_T: torch.Tensor, num_turns: int
) -> torch.Tensor:
    """float [B, H]: the sum of ``x`` over each turn's sampled tokens.

    Args:
        x_B_T: float [B, T], e.g. a per-token KL penalty.
        turn_ids_B_T: int [B, T].
        mask_B_T: 0/1 [B, T], sampled tokens.
        num_turns: H.
    """
    out = x_B_T.new_zeros(x_B_T.shape[0], num_turns)
    idx = turn_ids_B_T.clamp(min=0, max=max(num_turns - 1, 0)).long()
    return out.scatter_add_(1, idx, x_B_T * mask_B_T.to(x_B_T.dtype))
