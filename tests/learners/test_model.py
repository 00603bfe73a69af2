"""Chunked log-probs, batching and weight export on the tiny model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from taurl.learners.config import LoraConfig
from taurl.learners.model import add_lora, export_state_dict, policy_forward


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


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_chunked_logprob_gradient_matches_full(model, entropy_grad: bool) -> None:
    # entropy_grad False: the fused log-prob path; True: the checkpointed generic path
    # with gradient through the entropy too (an entropy bonus).
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
