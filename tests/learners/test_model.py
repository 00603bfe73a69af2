"""Chunked log-probs, batching and weight export on the tiny model."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from taurl.learners import forward
from taurl.learners import model as model_mod
from taurl.learners.config import LoraConfig
from taurl.learners.forward import length_buckets, scored_lengths, shared_prefixes
from taurl.learners.model import (
    add_lora,
    backbone_and_head,
    export_state_dict,
    new_value_head,
    policy_forward,
)


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


def full_reference(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unchunked computation: full float32 log-softmax over the vocabulary."""
    logits = model(input_ids=ids).logits.float()
    logp_all = logits.log_softmax(-1)
    logp = torch.zeros(ids.shape)
    logp[:, 1:] = logp_all[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = torch.zeros(ids.shape)
    ent[:, 1:] = -(logp_all.exp() * logp_all).sum(-1)[:, :-1]
    return logp, ent


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_logprobs_and_entropy_match_full_softmax(model, chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (3, 12), generator=g)
    mask = (torch.rand(3, 12, generator=g) > 0.5).float()
    mask[:, 0] = 0
    with torch.no_grad():
        ref_logp, ref_ent = full_reference(model, ids)
        out = policy_forward(model, ids, mask, chunk)
    torch.testing.assert_close(out.logp_B_T, ref_logp * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy_B_T, ref_ent * mask, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("entropy_grad", "keep_bytes"),
                         [(False, 0), (False, model_mod.KEEP_SOFTMAX_BYTES), (True, 0)])
def test_chunked_logprob_gradient_matches_full(model, entropy_grad: bool, keep_bytes: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # entropy_grad False: the fused log-prob path, its backward recomputing the logits
    # (keep_bytes 0) or reusing the softmax kept from forward; True: the checkpointed
    # generic path with gradient through the entropy too (an entropy bonus).
    monkeypatch.setattr(model_mod, "KEEP_SOFTMAX_BYTES", keep_bytes)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 1000, (2, 10), generator=g)
    mask = torch.ones(2, 10)
    mask[:, :3] = 0
    w = torch.randn(2, 10, generator=g)
    w_ent = torch.randn(2, 10, generator=g) if entropy_grad else torch.zeros(2, 10)
    model.zero_grad()
    ref_logp, ref_ent = full_reference(model, ids)
    ((ref_logp * w + ref_ent * w_ent) * mask).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = policy_forward(model, ids, mask, chunk_tokens=4, entropy_grad=entropy_grad)
    loss = (out.logp_B_T * w).sum()
    if entropy_grad:
        loss = loss + (out.entropy_B_T * w_ent).sum()
    loss.backward()
    for n, p in model.named_parameters():
        # float32 sums over the 49,152-token vocabulary differ by ~3e-5 in the entropy's
        # gradient (largest entries ~1), depending on summation order.
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-4, rtol=1e-4, msg=n)
    model.zero_grad()


def grouped_rows(prompts: int, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO-shaped rows: ``prompts`` prompts (7 and 9 tokens) × ``samples`` completions of
    different lengths, right-padded with 0; the mask is 1 on the completions."""
    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for p in range(prompts):
        prompt = torch.randint(100, 1000, (7 + 2 * p,), generator=g).tolist()
        for s in range(samples):
            completion = torch.randint(100, 1000, (3 + 2 * s,), generator=g).tolist()
            rows.append(prompt + completion)
            masks.append([0.0] * len(prompt) + [1.0] * len(completion))
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([m + [0.0] * (T - len(m)) for m in masks])
    return ids, mask


def forward_and_grads(model, ids, mask, loss, head=None, **kwargs):
    """``policy_forward`` then backward of ``loss(out)``: the output, the gradients (the
    value head's as ``head.*``) and each decoder call's token count (at the embedding)."""
    params = dict(model.named_parameters())
    if head is not None:
        params.update({f"head.{n}": p for n, p in head.named_parameters()})
    seen: list[int] = []
    embed = backbone_and_head(model)[0].get_input_embeddings()
    hook = embed.register_forward_hook(lambda _m, args, _o: seen.append(args[0].numel()))
    try:
        for p in params.values():
            p.grad = None
        out = policy_forward(model, ids, mask, 4, head, **kwargs)
        loss(out).sum().backward()
        return out, {n: p.grad.clone() for n, p in params.items()}, seen
    finally:
        hook.remove()
        for p in params.values():
            p.grad = None


def test_shared_prefixes_are_the_distinct_prompts_before_the_first_sampled_token() -> None:
    ids, mask = grouped_rows(prompts=2, samples=3, seed=0)
    prefixes, row_prefix = shared_prefixes(ids, mask)
    assert prefixes.shape == (2, 7)  # C = the earliest sampled position over the rows
    torch.testing.assert_close(prefixes[row_prefix], ids[:, :7])
    assert shared_prefixes(ids[::3], mask[::3]) is None  # one row per prompt: nothing shared
    mask[4] = 0  # a row with no sampled token: C = 0
    assert shared_prefixes(ids, mask) is None


def test_shared_prefix_forward_equals_the_plain_forward_with_gradients(model) -> None:
    """Running each prompt once through the KV cache gives the same log-probs, entropies,
    values and gradients as running every row whole, and the decoder sees fewer tokens."""
    ids, mask = grouped_rows(prompts=2, samples=3, seed=2)
    head = new_value_head(model.config.hidden_size, torch.device("cpu"))
    torch.nn.init.normal_(head.weight, std=0.1)  # a zero head would hide wrong hidden states
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3))
    results = {}
    for share in (False, True):
        out, grads, seen = forward_and_grads(
            model, ids, mask, lambda o: (o.logp_B_T + o.entropy_B_T) * w + o.values_B_T * mask,
            head, entropy_grad=True, share_prefix=share)
        results[share] = (out, grads, sum(seen))
    (plain, plain_grads, plain_tokens), (shared, shared_grads, shared_tokens) = (
        results[False], results[True])
    B, T = ids.shape
    assert plain_tokens == B * T
    assert shared_tokens == 2 * 7 + B * (T - 7)
    torch.testing.assert_close(shared.logp_B_T, plain.logp_B_T, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.entropy_B_T, plain.entropy_B_T, atol=1e-4, rtol=0)
    # values at every position, prompt included: the prefix's hidden states are real
    torch.testing.assert_close(shared.values_B_T, plain.values_B_T, atol=1e-5, rtol=0)
    for n, g in plain_grads.items():
        torch.testing.assert_close(shared_grads[n], g, atol=1e-4, rtol=1e-4, msg=n)


def test_length_buckets_split_only_where_padding_costs_more_than_a_call() -> None:
    lengths = [10, 100, 9, 98, 11]
    assert length_buckets(lengths, call_tokens=64) == [[1, 3], [4, 0, 2]]
    assert length_buckets(lengths, call_tokens=10**6) == [[1, 3, 4, 0, 2]]  # one call
    assert length_buckets(lengths, call_tokens=0) == [[1], [3], [4], [0], [2]]
    # after a shared prefix only the suffixes count: 5 and 1 tokens (11 - 95 -> 1)
    assert length_buckets([100, 11], call_tokens=5, start=95) == [[0, 1]]  # 2*5+5 < 5+5+1+5
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 1]])
    assert scored_lengths(mask) == [3, 1, 5]  # up to the last sampled token; 1 for none


@pytest.mark.parametrize("share", [False, True])
def test_length_buckets_give_the_plain_forward_with_gradients(model, share, monkeypatch) -> None:
    """Rows run in length buckets, no row past its last sampled token: the same log-probs,
    entropies and gradients as every row whole, from fewer decoder tokens."""
    ids, mask = grouped_rows(prompts=2, samples=4, seed=5)
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(6))
    results = {}
    monkeypatch.setitem(forward.PACK_ROWS, "cpu", False)  # as on a GPU: no packing
    for call_tokens in (10**9, 0):  # one call (the plain forward), then a call per length
        monkeypatch.setitem(forward.BUCKET_CALL_TOKENS, "cpu", call_tokens)
        out, grads, seen = forward_and_grads(
            model, ids, mask, lambda o: (o.logp_B_T + o.entropy_B_T) * w,
            entropy_grad=True, share_prefix=share)
        results[call_tokens] = (out, grads, sum(seen), len(seen))
    (whole, whole_grads, whole_tokens, _), (split, split_grads, split_tokens, calls) = (
        results[10**9], results[0])
    lengths = scored_lengths(mask)
    C = 7 if share else 0
    assert calls == len(set(lengths)) + share  # a call per distinct length (+ the prefixes)
    assert split_tokens == 2 * C + sum(n - C for n in lengths) < whole_tokens
    torch.testing.assert_close(split.logp_B_T, whole.logp_B_T, atol=1e-5, rtol=0)
    torch.testing.assert_close(split.entropy_B_T, whole.entropy_B_T, atol=1e-4, rtol=0)
    for n, g in whole_grads.items():
        torch.testing.assert_close(split_grads[n], g, atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("share", [False, True])
def test_packed_rows_give_the_plain_forward_with_gradients(model, share, monkeypatch) -> None:
    """Prompts and rows packed end to end in one sequence (every layer on the real tokens,
    attention per row and its prompt): the same log-probs, entropies and gradients as
    every row whole and padded, from one decoder call over only the real tokens."""
    assert model.config.model_type in forward.PACKABLE_MODEL_TYPES
    ids, mask = grouped_rows(prompts=2, samples=4, seed=5)
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(6))
    results = {}
    for pack in (False, True):
        monkeypatch.setitem(forward.PACK_ROWS, "cpu", pack)
        monkeypatch.setitem(forward.BUCKET_CALL_TOKENS, "cpu", 10**9)  # unpacked: one padded call
        results[pack] = forward_and_grads(
            model, ids, mask, lambda o: (o.logp_B_T + o.entropy_B_T) * w,
            entropy_grad=True, share_prefix=share)
    (whole, whole_grads, whole_seen), (packed, packed_grads, packed_seen) = (
        results[False], results[True])
    C = 7 if share else 0
    assert packed_seen == [2 * C + sum(n - C for n in scored_lengths(mask))]
    assert packed_seen[0] < sum(whole_seen)
    torch.testing.assert_close(packed.logp_B_T, whole.logp_B_T, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.entropy_B_T, whole.entropy_B_T, atol=1e-4, rtol=0)
    for n, g in whole_grads.items():
        torch.testing.assert_close(packed_grads[n], g, atol=1e-4, rtol=1e-4, msg=n)
    assert model.config._attn_implementation == "sdpa"  # given back after the packed call


@pytest.mark.parametrize("model_type", sorted(forward.PACKABLE_MODEL_TYPES))
def test_packing_is_exact_for_every_decoder_it_is_on_for(model_type, monkeypatch) -> None:
    """Each decoder type packing is on for, built small from its config (grouped-query
    attention, its own norms and biases): packed log-probs and gradients equal the padded
    forward's."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        model_type, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids, mask = grouped_rows(prompts=2, samples=3, seed=8)
    results = {}
    for pack in (False, True):
        monkeypatch.setitem(forward.PACK_ROWS, "cpu", pack)
        results[pack] = forward_and_grads(model, ids, mask, lambda o: o.logp_B_T * (1 + mask))
    (plain, plain_grads, _), (packed, packed_grads, seen) = results[False], results[True]
    assert len(seen) == 1
    torch.testing.assert_close(packed.logp_B_T, plain.logp_B_T, atol=1e-5, rtol=0)
    for n, g in plain_grads.items():
        torch.testing.assert_close(packed_grads[n], g, atol=1e-4, rtol=1e-4, msg=n)


def test_packing_falls_back_where_the_decoder_does_not_run_its_attention(model,
                                                                          monkeypatch) -> None:
    """A model type not known to take the packed attention runs unpacked; one whose layers
    never call it (they read another config) is caught after the call, and runs unpacked."""
    ids, mask = grouped_rows(prompts=2, samples=2, seed=1)
    monkeypatch.setitem(forward.BUCKET_CALL_TOKENS, "cpu", 10**9)
    _, _, seen = forward_and_grads(model, ids, mask, lambda o: o.logp_B_T)
    assert len(seen) == 1  # packed
    monkeypatch.setattr(forward, "PACKABLE_MODEL_TYPES", frozenset())
    _, _, seen = forward_and_grads(model, ids, mask, lambda o: o.logp_B_T)
    assert len(seen) == 2  # the prompts, then the rows' suffixes in one padded call
    monkeypatch.setattr(forward, "PACKABLE_MODEL_TYPES", frozenset({model.config.model_type}))
    monkeypatch.setattr(forward, "_attention", lambda config, name: contextlib.nullcontext())
    out, _, seen = forward_and_grads(model, ids, mask, lambda o: o.logp_B_T)
    assert len(seen) == 3  # a packed call whose attention was not ours, dropped; then unpacked
    monkeypatch.setitem(forward.PACK_ROWS, "cpu", False)
    plain, _, _ = forward_and_grads(model, ids, mask, lambda o: o.logp_B_T)
    torch.testing.assert_close(out.logp_B_T, plain.logp_B_T)


def test_shared_prefix_runs_under_activation_checkpointing(tiny_model: Path) -> None:
    """Under activation checkpointing a shared prompt still runs once (its K rows not
    checkpointed; the rows' suffixes checkpointed, the prefix cache passed through and never
    written, so the recomputation sees the same one): the plain forward's log-probs and
    gradients, from fewer decoder tokens; the layers are left as they were."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, mask = grouped_rows(prompts=2, samples=3, seed=4)
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(7))
    results = {}
    for share in (False, True):
        out, grads, seen = forward_and_grads(model, ids, mask, lambda o: o.logp_B_T * w,
                                             share_prefix=share)
        results[share] = (out, grads, sum(seen))
    (plain, plain_grads, plain_tokens), (shared, shared_grads, shared_tokens) = (
        results[False], results[True])
    assert shared_tokens < plain_tokens
    torch.testing.assert_close(shared.logp_B_T, plain.logp_B_T, atol=1e-5, rtol=0)
    for n, g in plain_grads.items():
        torch.testing.assert_close(shared_grads[n], g, atol=1e-4, rtol=1e-4, msg=n)
    layers = [m for m in model.modules() if hasattr(m, "_can_checkpoint_with_cache")]
    assert layers and all(m.gradient_checkpointing for m in layers)
    assert not any("_can_checkpoint_with_cache" in vars(m) for m in layers)


def test_export_state_dict_uses_hf_names_and_drops_tied_copy(model, tiny_model: Path) -> None:
    sd = export_state_dict(model, torch.bfloat16)
    from safetensors import safe_open

    with safe_open(str(tiny_model / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert set(sd) == saved  # exactly what save_pretrained writes (tied lm_head once)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())


def test_export_merges_lora(tiny_model: Path) -> None:
    # peft is an optional extra (taurl[lora]); without it there is no LoRA to merge.
    pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft_model = add_lora(base, LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # lora_B starts at 0; make the adapter do something
    ours = export_state_dict(peft_model)
    ids = torch.randint(100, 1000, (1, 8))
    with torch.no_grad():
        expect = peft_model(input_ids=ids).logits
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(ours, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    plain.tie_weights()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expect, atol=1e-4, rtol=1e-4)


def test_learners_import_no_envs_agents_or_engines() -> None:
    code = (
        "import sys, taurl.learners; "
        "bad = [m for m in sys.modules if m.startswith(('taurl.envs', 'taurl.agents', "
        "'taurl.rollout', 'vllm', 'gymnasium'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


FAULTS_OF_A_REUSED_BUFFER = """
import resource, sys, torch
from taurl.learners.model import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(3):  # 64 MiB, freed at once: the allocator settles on where it keeps it
    torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):  # the same size again, as an update's tensors are step after step
    torch.ones(16 << 20)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


# mallopt and the mmap-per-large-block default it turns off are glibc's: elsewhere there is
# nothing to measure (keep_freed_memory returns False there)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures glibc's allocator")
def test_keep_freed_memory_stops_large_tensors_from_faulting_in_again() -> None:
    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_BUFFER, mode],
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0], int(out[1])

    _, default = faults("default")
    kept, reused = faults("keep")
    assert kept == "True"
    # 64 MiB is 16,384 pages of 4 KiB: by default glibc maps fresh ones every time (5 × 16,384
    # faults); kept, the freed block is reused (at most one of the five, seen now and then,
    # still lands on new pages while glibc settles)
    assert default > 4.5 * 16_384 and reused < 16_384 + 1_000, (default, reused)


def test_export_state_dict_without_copy_hands_out_the_parameters(model) -> None:
    params = {n: p for n, p in model.named_parameters()}
    shared = export_state_dict(model, torch.float32, copy=False)
    assert all(v.data_ptr() == params[k].data_ptr() and not v.requires_grad
               for k, v in shared.items())
    copied = export_state_dict(model, torch.float32)
    assert all(v.data_ptr() != params[k].data_ptr() for k, v in copied.items())
    converted = export_state_dict(model, torch.bfloat16, copy=False)  # a conversion is a copy
    assert all(v.dtype == torch.bfloat16 for v in converted.values())
