"""Packed rows against unpacked ones: the same GRPO update, alternately, in one process.

The learner's default on a CPU runs a micro-batch's distinct prompts and its rows' own tokens
end to end as one sequence (``taurl.learners.forward.PACK_ROWS``): every layer but attention
on the real tokens only, in large matmuls. Unpacked, the prompts run once through a KV cache
and the rows in length buckets, each padded to its longest row (the default on a GPU). This
script times ``Learner.update`` on the same trajectories both ways, alternating update by
update in one process (the machine's drift between processes is larger than the difference),
after one warm-up update each, and prints the median and min of each and their ratio.

    python benchmarks/packing.py                    # the peer benchmark's shapes, SmolLM2 float32
    python benchmarks/packing.py --single-turn          # one answer of 1-64 tokens per row, as the peer work
    python benchmarks/packing.py --seq-len 384 --prompt-len 192 --group-size 4 --reps 4
    python benchmarks/packing.py --single-turn --compare softmax   # the LM head's softmax kept or recomputed

``--compare softmax`` alternates another choice the same way: the LM head's float32 softmax kept
from forward for backward (the default when it fits ``taurl.learners.model.KEEP_SOFTMAX_BYTES``)
against its logits recomputed in backward (one vocabulary-sized matmul more), both packed.

The trajectories are ``benchmarks/learner.py``'s (``--ragged``: answers cut at random lengths;
two turns with a 16-token observation between them), or with ``--single-turn`` one answer per
row after the group's prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's taurl first
sys.path.insert(1, str(Path(__file__).resolve().parent))


def single_turn(batch: int, seq_len: int, group_size: int, prompt_len: int, seed: int = 0):
    """``batch`` one-turn trajectories: a ``prompt_len`` prompt shared within each group, then
    an answer of 1 to ``seq_len - prompt_len`` sampled tokens (random ids and lengths)."""
    import random

    from taurl.types import Trajectory

    rng = random.Random(seed)
    out, prompts = [], {}
    for i in range(batch):
        prompt = prompts.setdefault(i // group_size,
                                    [rng.randrange(100, 40000) for _ in range(prompt_len)])
        n = rng.randint(1, seq_len - prompt_len)
        reward = float(i % 2)
        out.append(Trajectory(
            token_ids=prompt + [rng.randrange(100, 40000) for _ in range(n)],
            loss_mask=[0] * prompt_len + [1] * n, logprobs=[0.0] * prompt_len + [-1.0] * n,
            turn_ids=[-1] * prompt_len + [0] * n, rewards=[reward], episode_return=reward,
            termination="terminated", group_id=f"g{i // group_size}"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=108)
    p.add_argument("--prompt-len", type=int, default=44)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["auto", "bf16", "float32"])
    p.add_argument("--reps", type=int, default=6, help="measured updates each way")
    p.add_argument("--single-turn", action="store_true",
                   help="one sampled answer per row, 1 to seq-len - prompt-len tokens (the peer "
                        "work's shape) instead of benchmarks/learner.py's two turns")
    p.add_argument("--compare", default="packing", choices=["packing", "softmax"],
                   help="packing: packed vs unpacked rows; softmax: the LM head's softmax kept "
                        "from forward vs recomputed in backward")
    args = p.parse_args()

    from learner import make_trajectories

    from taurl.learners import Learner, forward
    from taurl.learners import model as model_mod
    from taurl.models import resolve_model
    from taurl.trainer import TrainConfig

    learner = Learner(dataclasses.replace(TrainConfig().learner, dtype=args.dtype),
                      resolve_model(args.model))
    if learner.device.type != "cpu":
        raise SystemExit("packing is the CPU's default; this benchmark runs on the CPU")
    if args.single_turn:
        trajs = single_turn(args.batch, args.seq_len, args.group_size, args.prompt_len)
    else:
        trajs = make_trajectories(args.batch, args.seq_len, args.group_size,
                                  prompt_len=args.prompt_len, shared_prompt=True, ragged=True)
    keep = model_mod.KEEP_SOFTMAX_BYTES
    first, second = ("packed", "unpacked") if args.compare == "packing" else ("kept", "recomputed")
    times: dict[str, list[float]] = {first: [], second: []}
    for rep in range(args.reps + 1):  # the first round warms both up
        for name, seconds in times.items():
            if args.compare == "packing":
                forward.PACK_ROWS["cpu"] = name == "packed"
            else:
                model_mod.KEEP_SOFTMAX_BYTES = keep if name == "kept" else 0
            start = time.perf_counter()
            learner.update(trajs)
            if rep:
                seconds.append(time.perf_counter() - start)
        if rep:
            print(f"round {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  flush=True)
    forward.PACK_ROWS["cpu"], model_mod.KEEP_SOFTMAX_BYTES = True, keep
    out = {k: {"median": statistics.median(v), "min": min(v)} for k, v in times.items()}
    ratio = out[second]["median"] / out[first]["median"]
    tokens = sum(len(t.token_ids) for t in trajs)
    print(json.dumps({"model": args.model, "dtype": args.dtype, "tokens": tokens, **out,
                      f"{second}_over_{first}": ratio}))
    print(f"{first} {out[first]['median']:.2f} s per update (min {out[first]['min']:.2f}) vs "
          f"{second} {out[second]['median']:.2f} (min {out[second]['min']:.2f}): "
          f"{ratio:.2f}x faster {first}")


if __name__ == "__main__":
    main()
