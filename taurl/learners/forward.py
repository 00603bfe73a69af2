"""The decoder's forward over a micro-batch, without the work padding and shared prompts add.

Two savings, each exact up to float rounding (tests compare log-probs and gradients with
the plain padded forward): rows that share a prompt (a GRPO group) run it once, its KV
cache indexed out to the rows (:func:`shared_prefixes`; under activation checkpointing too,
through a :func:`_prefix_cache_class` cache that is never written); rows of very different
lengths run in length buckets, none past its last sampled token (:func:`length_buckets`).
:func:`decoder_hidden` applies both; ``model.policy_forward`` calls it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


def shared_prefixes(
    input_ids_B_T: torch.Tensor, mask_B_T: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The distinct contexts the rows read before their first sampled token, to run once each.

    C is the earliest sampled position over the rows: every row's first C tokens are
    context (prompt), none of them a token to score. A GRPO group's samples share their
    prompt, so K distinct prefixes stand for B rows.

    Returns:
        ``(prefixes_K_C, row_prefix_B)`` (int64; row b's first C tokens are
        ``prefixes_K_C[row_prefix_B[b]]``), or None when running the prefixes once
        saves nothing (K = B, or C = 0, e.g. a row with no sampled token).
    """
    B = input_ids_B_T.shape[0]
    if B < 2:
        return None
    C = int((mask_B_T > 0).float().argmax(1).min())
    if C < 1:
        return None
    prefixes_K_C, row_prefix_B = torch.unique(input_ids_B_T[:, :C], dim=0, return_inverse=True)
    if prefixes_K_C.shape[0] == B:
        return None
    return prefixes_K_C, row_prefix_B


def _checkpointed(backbone: nn.Module) -> list[nn.Module]:
    """The modules with activation checkpointing on now (training): the model, which then
    turns its cache off, and transformers' checkpointing layers, which can pass a KV cache
    through when told they may (``_can_checkpoint_with_cache``)."""
    if not backbone.training:
        return []
    return [m for m in backbone.modules() if getattr(m, "gradient_checkpointing", False) is True]


def _can_share_prefix(backbone: nn.Module, width: int) -> bool:
    """A KV cache carries the prefix exactly: no sliding window shorter than the rows, and
    activation checkpointing (if on) of transformers' layers, which can take a cache."""
    if backbone.training and getattr(backbone, "is_gradient_checkpointing", False) and not any(
            hasattr(m, "_can_checkpoint_with_cache") for m in _checkpointed(backbone)):
        return False
    config = getattr(backbone, "config", None)
    window = getattr(config, "sliding_window", None)
    return not (window and getattr(config, "use_sliding_window", True) and window < width)


@contextlib.contextmanager
def _checkpointing(modules: list[nn.Module], on: bool) -> Iterator[None]:
    """Activation checkpointing off (``on`` False: the prefix, whose K rows keep their
    activations), or on with the prefix cache passed through the layers (never written)."""
    for m in modules:
        if not on:
            m.gradient_checkpointing = False
        elif hasattr(m, "_can_checkpoint_with_cache"):
            m._can_checkpoint_with_cache = True  # this instance only
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop("_can_checkpoint_with_cache", None)
            m.gradient_checkpointing = True


@functools.cache
def _prefix_cache_class() -> type:
    from transformers.cache_utils import DynamicCache

    class PrefixCache(DynamicCache):
        """A prefix's KV that each layer call extends without storing the extension, so a
        call can run again (activation checkpointing recomputes it) and see the same cache."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                   *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
            layer = self.layers[layer_idx]
            return (torch.cat([layer.keys, key_states], dim=-2),
                    torch.cat([layer.values, value_states], dim=-2))

    return PrefixCache


# What one more decoder call costs, in padded tokens, when :func:`length_buckets` weighs
# splitting a micro-batch by length: on a CPU a call's fixed cost is a few tokens' worth of
# compute (64 keeps the matmuls large); a GPU runs padding almost free next to a launch.
BUCKET_CALL_TOKENS = {"cpu": 64, "cuda": 4096}


def length_buckets(lengths: list[int], call_tokens: int, start: int = 0) -> list[list[int]]:
    """Rows split into runs of similar length, each run to be padded only to its longest.

    Minimises the padded tokens, ``Σ rows × (longest − start)`` over the runs, plus
    ``call_tokens`` per run (a decoder call's fixed cost): dynamic programming over the
    rows sorted longest first. ``start``: tokens every row skips (a shared prefix).
    Returns runs of row indices, longest rows first; one run when splitting saves nothing.
    """
    order = sorted(range(len(lengths)), key=lambda b: -lengths[b])
    width = [max(lengths[b] - start, 1) for b in order]
    best, cut = [0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):  # the first j rows; the last run is rows i..j-1
        for i in range(j):
            cost = best[i] + (j - i) * width[i] + call_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], len(order)
    while j:
        runs.append(order[cut[j]:j])
        j = cut[j]
    return runs[::-1]


def scored_lengths(mask_B_T: torch.Tensor) -> list[int]:
    """Per row, the tokens the decoder must run to score it: up to its last sampled token."""
    T = mask_B_T.shape[1]
    last = T - 1 - (mask_B_T > 0).flip(1).float().argmax(1)
    return [int(x) + 1 if m else 1 for x, m in zip(last.tolist(), (mask_B_T > 0).any(1).tolist(),
                                                     strict=True)]


def _run_buckets(run: Callable[[list[int], int], torch.Tensor], lengths: list[int],
                 start: int, width: int, call_tokens: int) -> torch.Tensor:
    """[B, width − start, D]: ``run(rows, L)`` (hidden states of positions start..L) per
    length bucket, zero-padded to ``width`` and put back in row order."""
    runs = length_buckets(lengths, call_tokens, start)
    if len(runs) == 1:  # rows in their own order
        runs = [list(range(len(lengths)))]
    parts = []
    for rows in runs:
        h = run(rows, max(lengths[b] for b in rows))
        parts.append(F.pad(h, (0, 0, 0, width - start - h.shape[1])))
    order = [b for rows in runs for b in rows]
    if order == sorted(order):
        return torch.cat(parts)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse.to(parts[0].device)]


def decoder_hidden(backbone: nn.Module, input_ids_B_T: torch.Tensor,
                   mask_B_T: torch.Tensor, share_prefix: bool = True,
                   buckets: bool = True) -> torch.Tensor:
    """[B, T, D] last hidden states at the positions that score a sampled token.

    Two savings, each exact up to float rounding: with shared prefixes
    (:func:`shared_prefixes`, ``share_prefix``) the decoder runs the K distinct
    prefixes, copies their KV cache to the B rows and runs only the rows' suffixes
    against it (K·C + B·(T − C) tokens instead of B·T; through the cache, the same
    gradients); with ``buckets`` rows of very different lengths run in length buckets
    (:func:`length_buckets`), each padded only to its own longest row, and no row past
    its last sampled token. Hidden states past a row's last sampled token are 0.
    """
    B, T = input_ids_B_T.shape
    lengths = scored_lengths(mask_B_T) if buckets else [T] * B
    call_tokens = BUCKET_CALL_TOKENS.get(input_ids_B_T.device.type, 4096)

    def whole(rows: list[int], L: int) -> torch.Tensor:
        ids = input_ids_B_T if len(rows) == B and L == T else input_ids_B_T[rows, :L]
        return backbone(input_ids=ids, use_cache=False).last_hidden_state

    shared = shared_prefixes(input_ids_B_T, mask_B_T) if share_prefix else None
    if shared is None or not _can_share_prefix(backbone, T):
        return _run_buckets(whole, lengths, 0, T, call_tokens)
    prefixes_K_C, row_prefix_B = shared
    C = prefixes_K_C.shape[1]
    checkpointed = _checkpointed(backbone)
    with _checkpointing(checkpointed, on=False):
        head = backbone(input_ids=prefixes_K_C, use_cache=True)
    cache = head.past_key_values
    if type(cache).__name__ != "DynamicCache" or not all(
            hasattr(layer, "keys") for layer in cache.layers):  # a cache we cannot index: rows whole
        return _run_buckets(whole, lengths, 0, T, call_tokens)
    kv = [(layer.keys, layer.values) for layer in cache.layers]

    def suffix(rows: list[int], L: int) -> torch.Tensor:
        # the rows' prefixes' KV (an index, so gradients flow back), then their suffixes
        idx = row_prefix_B[rows]
        rows_cache = _prefix_cache_class()(
            [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in kv],
            config=getattr(backbone, "config", None))
        with _checkpointing(checkpointed, on=True):
            return backbone(input_ids=input_ids_B_T[rows, C:L], past_key_values=rows_cache,
                            use_cache=False).last_hidden_state

    tail = _run_buckets(suffix, lengths, C, T, call_tokens)
    return torch.cat([head.last_hidden_state[row_prefix_B], tail], dim=1)
