"""The decoder's forward over a micro-batch, without the work padding and shared prompts add.

Savings, each exact up to float rounding (tests compare log-probs and gradients with
the plain padded forward): rows that share a prompt (a GRPO group) run it once
(:func:`shared_prefixes`), and no row runs past its last sampled token. On a CPU the rows
are *packed*: prompts and rows laid end to end in one sequence at their own positions, every
layer but attention running on the real tokens only, attention per segment
(:func:`_packed_attention`, registered with transformers), so the matmuls are as large as
the batch and nothing is padded. Elsewhere (a GPU runs padding almost free) the prompts' KV
cache is indexed out to the rows (under activation checkpointing too, through a
:func:`_prefix_cache_class` cache that is never written) and rows of very different lengths
run in length buckets (:func:`length_buckets`). :func:`decoder_hidden` chooses;
``model.policy_forward`` calls it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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


# Whether rows are packed, by device type. On a CPU small matmuls run far below peak
# (float32, 2-core EPYC: GEMMs of 88 rows at 95-130 GFLOP/s and weight gradients with 88 to
# 350 in the reduction at 30-80, against ~175 for 600 rows), so running a micro-batch's real
# tokens as one sequence pays; a GPU pads almost free (and is not measured packed).
PACK_ROWS = {"cpu": True, "cuda": False}
#: Decoders whose attention is plain softmax(q·k·scale)·v over the keys a mask allows (no
#: soft-capping, sinks or ALiBi), which :func:`_packed_attention` reproduces.
PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_PACKED_ATTENTION = "taurl_packed"


@dataclass
class PackedSegments:
    """Where each segment of a packed sequence finds its queries and keys.

    A segment is a prefix (a prompt the rows of a group share) or a row's own tokens; a
    row's keys are its prefix's tokens, then its own. S segments, padded to Lq queries and
    Lk keys; indices are positions in the packed sequence (0 in padding).
    """

    q_idx_S_Lq: torch.Tensor
    kv_idx_S_Lk: torch.Tensor
    mask_S_1_Lq_Lk: torch.Tensor  # bool: the keys each query attends to
    valid_SLq: torch.Tensor  # bool [S·Lq]: the queries that are tokens (not padding)
    calls: int = 0  # attention layers that ran through :func:`_packed_attention`


def _packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      taurl_segments: PackedSegments | None = None,
                      **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers attention function for a packed sequence ([1, heads, N, d]): each
    segment's queries attend to its own keys (causally) and its prefix's, gathered into a
    padded [S, heads, Lq, Lk] SDPA call and scattered back: the attention of the rows run
    apart, while every other layer runs on the N packed tokens."""
    seg = taurl_segments
    if seg is None:
        raise RuntimeError("taurl's packed attention ran without its segments")
    seg.calls += 1
    (S, Lq), Lk = seg.q_idx_S_Lq.shape, seg.kv_idx_S_Lk.shape[1]
    H, N, d = query.shape[1:]
    Hkv = key.shape[1]
    q = query[0].index_select(1, seg.q_idx_S_Lq.reshape(-1)).view(H, S, Lq, d).transpose(0, 1)
    k = key[0].index_select(1, seg.kv_idx_S_Lk.reshape(-1)).view(Hkv, S, Lk, d).transpose(0, 1)
    v = value[0].index_select(1, seg.kv_idx_S_Lk.reshape(-1)).view(Hkv, S, Lk, d).transpose(0, 1)
    if Hkv != H:  # grouped-query attention: each key head serves H / Hkv query heads
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.mask_S_1_Lq_Lk,
                                       dropout_p=dropout, scale=scaling)
    o = o.transpose(1, 2).reshape(S * Lq, H, d)[seg.valid_SLq]
    out = o.new_zeros(N, H, d).index_copy(0, seg.q_idx_S_Lq.reshape(-1)[seg.valid_SLq], o)
    return out[None], None


@functools.cache
def _packed_attention_name() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(_PACKED_ATTENTION, _packed_attention)
    return _PACKED_ATTENTION


@contextlib.contextmanager
def _attention(config: object, name: str) -> Iterator[None]:
    old = config._attn_implementation  # type: ignore[attr-defined]
    config._attn_implementation = name  # type: ignore[attr-defined]
    try:
        yield
    finally:
        config._attn_implementation = old  # type: ignore[attr-defined]


def can_pack(backbone: nn.Module, width: int) -> bool:
    """Rows of ``backbone`` can run packed: a decoder of :data:`PACKABLE_MODEL_TYPES`, no
    sliding window shorter than the rows, and no activation checkpointing (whose recompute
    runs outside the packed call and would not see its attention)."""
    config = getattr(backbone, "config", None)
    if getattr(config, "model_type", None) not in PACKABLE_MODEL_TYPES or _checkpointed(backbone):
        return False
    window = getattr(config, "sliding_window", None)
    return not (window and getattr(config, "use_sliding_window", True) and window < width)


def _packed_hidden(backbone: nn.Module, input_ids_B_T: torch.Tensor, lengths: list[int],
                   start: int, row_prefix: list[int]) -> torch.Tensor | None:
    """[B, T, D] from one packed decoder call: each distinct prefix (the rows' first
    ``start`` tokens; ``row_prefix[b]`` names row b's) once, then each row's tokens
    ``start .. lengths[b] − 1``, end to end at their own positions; the rows' prefix
    positions read their prefix's run; 0 past a row's length. None when the decoder did
    not run :func:`_packed_attention` (its layers read another config)."""
    B, T = input_ids_B_T.shape
    device = input_ids_B_T.device
    prefixes = list(dict.fromkeys(row_prefix)) if start else []
    first_row = {p: row_prefix.index(p) for p in prefixes}
    src_row = [first_row[p] for p in prefixes for _ in range(start)]
    src_col = [t for _ in prefixes for t in range(start)]
    q_first = [i * start for i in range(len(prefixes))]
    q_len = [start] * len(prefixes)
    kv_first, kv_len = [0] * len(prefixes), [0] * len(prefixes)  # a prefix has none before it
    for b in range(B):
        q_first.append(len(src_row))
        q_len.append(lengths[b] - start)
        kv_first.append(prefixes.index(row_prefix[b]) * start if start else 0)
        kv_len.append(start)
        src_row += [b] * (lengths[b] - start)
        src_col += range(start, lengths[b])
    rows, cols = torch.tensor(src_row), torch.tensor(src_col)
    q_first_S, q_len_S = torch.tensor(q_first), torch.tensor(q_len)
    p_first_S, p_len_S = torch.tensor(kv_first), torch.tensor(kv_len)
    Lq, Lk = int(q_len_S.max()), int((q_len_S + p_len_S).max())
    i = torch.arange(Lq)
    valid = i[None] < q_len_S[:, None]  # [S, Lq]
    j = torch.arange(Lk)[None]
    in_prefix = j < p_len_S[:, None]  # [S, Lk]
    own = j - p_len_S[:, None]  # a key's index among the segment's own tokens
    key_ok = in_prefix | ((own >= 0) & (own < q_len_S[:, None]))
    kv_idx = torch.where(in_prefix, p_first_S[:, None] + j, q_first_S[:, None] + own)
    mask = key_ok[:, None] & (in_prefix[:, None] | (own[:, None] <= i[None, :, None]))
    mask &= valid[:, :, None]
    mask[:, :, 0] |= ~valid  # a padding query sees one key (no empty softmax); it is dropped
    segments = PackedSegments(
        torch.where(valid, q_first_S[:, None] + i, 0).to(device),
        torch.where(key_ok, kv_idx, 0).to(device), mask[:, None].to(device),
        valid.reshape(-1).to(device))
    with _attention(backbone.config, _packed_attention_name()):
        hidden = backbone(input_ids=input_ids_B_T[rows.to(device), cols.to(device)][None],
                          position_ids=cols[None].to(device), use_cache=False,
                          taurl_segments=segments).last_hidden_state[0]
    if segments.calls == 0:
        return None
    n_prefix = len(prefixes) * start
    dest = [(rows * T + cols)[n_prefix:]]  # the rows' own tokens
    src = [torch.arange(n_prefix, rows.shape[0])]
    if start:  # row b's first positions: its prefix's run
        dest.append((torch.arange(B)[:, None] * T + torch.arange(start)).reshape(-1))
        src.append((p_first_S[len(prefixes):, None] + torch.arange(start)).reshape(-1))
    out = hidden.new_zeros(B * T, hidden.shape[-1])
    out = out.index_copy(0, torch.cat(dest).to(device),
                         hidden.index_select(0, torch.cat(src).to(device)))
    return out.view(B, T, -1)


def decoder_hidden(backbone: nn.Module, input_ids_B_T: torch.Tensor,
                   mask_B_T: torch.Tensor, share_prefix: bool = True,
                   buckets: bool = True) -> torch.Tensor:
    """[B, T, D] last hidden states at the positions that score a sampled token.

    Savings, each exact up to float rounding: with shared prefixes
    (:func:`shared_prefixes`, ``share_prefix``) the decoder runs the K distinct prefixes
    once, not once per row (K·C + B·(T − C) tokens instead of B·T; the same gradients);
    with ``buckets`` no row runs past its last sampled token. Where the device packs
    (:data:`PACK_ROWS`) and the decoder can (:func:`can_pack`), the prefixes and rows run
    as one sequence, end to end, nothing padded (:func:`_packed_hidden`); otherwise the
    prefixes' KV cache is copied to the rows, which run their suffixes against it in
    length buckets (:func:`length_buckets`), each padded only to its own longest row.
    ``buckets`` False (a value head reads every position): rows run whole, padded.
    Hidden states past a row's last sampled token are 0.
    """
    B, T = input_ids_B_T.shape
    lengths = scored_lengths(mask_B_T) if buckets else [T] * B
    call_tokens = BUCKET_CALL_TOKENS.get(input_ids_B_T.device.type, 4096)
    shared = shared_prefixes(input_ids_B_T, mask_B_T) if share_prefix else None
    if buckets and PACK_ROWS.get(input_ids_B_T.device.type) and can_pack(backbone, T):
        start = shared[0].shape[1] if shared is not None else 0
        row_prefix = shared[1].tolist() if shared is not None else list(range(B))
        packed = _packed_hidden(backbone, input_ids_B_T, lengths, start, row_prefix)
        if packed is not None:
            return packed

    def whole(rows: list[int], L: int) -> torch.Tensor:
        ids = input_ids_B_T if len(rows) == B and L == T else input_ids_B_T[rows, :L]
        return backbone(input_ids=ids, use_cache=False).last_hidden_state

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
