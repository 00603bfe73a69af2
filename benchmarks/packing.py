"""Packed rows against unpacked ones: the same GRPO update, alternately, in one process.

The learner's default on a CPU runs a micro-batch's distinct prompts and its rows' own tokens
end to end as one sequence (``taurl.learners.forward.PACK_ROWS``): every layer but attention
on the real tokens only, in large matmuls. Unpacked, the prompts run once through a KV cache
and the rows in length buckets, each padded to its longest row (the default on a GPU). This
script times ``Learner.update`` on the same trajectories both ways, alternating update by
update in one process (the machine's drift between processes is larger than the difference),
after one warm-up update each, and prints the median and min of each and their ratio.

    python benchmarks/packing.py                    # the peer benchmark's shapes, SmolLM2 float32
    python benchmarks/packing.py --seq-len 384 --prompt-len 192 --group-size 4 --reps 4

The trajectories are ``benchmarks/learner.py``'s (``--ragged``: answers cut at random lengths;
two turns with a 16-token observation between them).
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=108)
    p.add_argument("--prompt-len", type=int, default=44)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["auto", "bf16", "float32"])
    p.add_argument("--reps", type=int, default=6, help="measured updates each way")
    args = p.parse_args()

    from learner import make_trajectories

    from taurl.learners import Learner, forward
    from taurl.models import resolve_model
    from taurl.trainer import TrainConfig

    learner = Learner(dataclasses.replace(TrainConfig().learner, dtype=args.dtype),
                      resolve_model(args.model))
    if learner.device.type != "cpu":
        raise SystemExit("packing is the CPU's default; this benchmark runs on the CPU")
    trajs = make_trajectories(args.batch, args.seq_len, args.group_size,
                              prompt_len=args.prompt_len, shared_prompt=True, ragged=True)
    times: dict[str, list[float]] = {"packed": [], "unpacked": []}
    for rep in range(args.reps + 1):  # the first round warms both up
        for name, seconds in times.items():
            forward.PACK_ROWS["cpu"] = name == "packed"
            start = time.perf_counter()
            learner.update(trajs)
            if rep:
                seconds.append(time.perf_counter() - start)
        if rep:
            print(f"round {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  flush=True)
    forward.PACK_ROWS["cpu"] = True
    out = {k: {"median": statistics.median(v), "min": min(v)} for k, v in times.items()}
    ratio = out["unpacked"]["median"] / out["packed"]["median"]
    tokens = sum(len(t.token_ids) for t in trajs)
    print(json.dumps({"model": args.model, "dtype": args.dtype, "tokens": tokens, **out,
                      "unpacked_over_packed": ratio}))
    print(f"packed {out['packed']['median']:.2f} s per update (min {out['packed']['min']:.2f}) vs "
          f"unpacked {out['unpacked']['median']:.2f} (min {out['unpacked']['min']:.2f}): "
          f"{ratio:.2f}x faster packed")


if __name__ == "__main__":
    main()
