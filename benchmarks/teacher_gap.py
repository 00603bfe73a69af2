"""The teacher gap of a policy on its own trajectories: mean(log p_teacher − log p_policy).

GRPO-OPD trains on this per-token gap (``reward/teacher_gap`` in the training metrics, on
the batch being learned). To compare policies trained with and without the teacher on the
same footing, this script scores trajectories a policy wrote (e.g. the ``--out`` folder of
``taurl eval``) with both the policy and the teacher, token-exactly, as the learner does:

    python benchmarks/teacher_gap.py --teacher qwen2.5-coder-1.5b \\
        --policy runs/grpo-agent-sql/checkpoints/iter-000007/policy OUT/trajectories-policy-taurl_SQL-v0.jsonl \\
        --policy qwen2.5-coder-0.5b OUT/trajectories-qwen2.5-coder-0.5b-taurl_SQL-v0.jsonl

Each ``--policy MODEL FILE`` pair is scored on its first ``--max-trajectories`` episodes.
A gap near 0 means the teacher finds the policy's tokens about as likely as the policy does
(the student has come close to the teacher where it acts); more negative means farther.
Printed per policy: the token-weighted mean, the mean over episodes with its 95% interval,
and the tokens scored. Runs in torch on the CPU (bf16 autocast where the CPU has it, as
the learner).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from taurl.learners.model import autocast, load_causal_lm, pick_autocast_dtype, policy_forward
from taurl.models import resolve_model
from taurl.types import read_jsonl


def score(model: torch.nn.Module, token_ids: list[int], mask: list[int], dtype) -> torch.Tensor:
    """Log-prob of each masked token of one trajectory under ``model`` ([n masked])."""
    ids = torch.tensor([token_ids])
    m = torch.tensor([mask], dtype=torch.float32)
    with torch.no_grad(), autocast(torch.device("cpu"), dtype):
        logp = policy_forward(model, ids, m, chunk_tokens=1024).logp_B_T
    return logp[0][m[0] > 0].float()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher model (built-in name or folder)")
    ap.add_argument("--policy", nargs=2, action="append", required=True, metavar=("MODEL", "JSONL"),
                    help="a policy and a trajectories file it wrote (repeatable)")
    ap.add_argument("--max-trajectories", type=int, default=32)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    dtype = pick_autocast_dtype("auto", torch.device("cpu"))
    teacher = load_causal_lm(resolve_model(args.teacher), torch.device("cpu")).eval()
    results = []
    for model_name, path in args.policy:
        trajs = [t for t in read_jsonl(path) if any(t.loss_mask)][: args.max_trajectories]
        policy = load_causal_lm(resolve_model(model_name), torch.device("cpu")).eval()
        start = time.perf_counter()
        per_episode, total, tokens = [], 0.0, 0
        for t in trajs:
            gap = score(teacher, t.token_ids, t.loss_mask, dtype) - score(
                policy, t.token_ids, t.loss_mask, dtype)
            per_episode.append(gap.mean().item())
            total += gap.sum().item()
            tokens += gap.numel()
        del policy
        n = len(per_episode)
        mean = sum(per_episode) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in per_episode) / (n - 1)) if n > 1 else 0.0
        row = {
            "policy": model_name, "trajectories": path, "episodes": n, "tokens": tokens,
            "gap_token_mean": total / tokens, "gap_episode_mean": mean,
            "gap_episode_ci95": 1.96 * sd / math.sqrt(n) if n > 1 else 0.0,
            "seconds": round(time.perf_counter() - start, 1),
        }
        results.append(row)
        print(f"{model_name}: gap {row['gap_token_mean']:+.3f} nats/token (token mean); "
              f"{mean:+.3f} ± {row['gap_episode_ci95']:.3f} (episode mean, 95% CI); "
              f"{n} episodes, {tokens} tokens, {row['seconds']} s", flush=True)
    out = {"teacher": args.teacher, "autocast": str(dtype), "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
