"""Learner throughput: one GRPO update vs a bare forward+backward+AdamW step, same tokens.

Both run the same model on the same trajectories, packed into the same micro-batches
(``--micro-batch-tokens``), under the same precision. The bare loop is the floor any
learner pays, written as efficiently as plain PyTorch allows: the decoder's hidden
states → the LM head on the sampled positions only → cross-entropy → backward →
AdamW. The GRPO update adds what GRPO needs (advantages, ratio, clipping, importance
weights, metrics), computed over the same tokens (``share_prefix`` off). A third phase,
``grpo-shared``, is the default update, which runs a prompt the rows of a group share only
once (``learner.share_prefix``); ``--shared-prompt`` gives each group one prompt, as GRPO's
samples have (otherwise every row's tokens are random and nothing is shared). With
``--ragged`` the rows' last turns end at random lengths, as sampled answers do, and two more
phases run them unpacked: ``grpo-shared-buckets`` in length buckets
(``taurl.learners.forward.length_buckets``, the default on a GPU), ``grpo-shared-whole``
padded to the longest row in one decoder call (on a CPU the default update packs the rows end
to end in one call, ``taurl.learners.forward.PACK_ROWS``; ``benchmarks/packing.py`` compares
packed and unpacked updates within one process, where this machine's drift is smaller).
With ``--unmapped-memory`` a last phase, ``grpo-shared-unmapped``, is the default update with
``learner.cpu_keep_freed_memory`` off: glibc's default, which unmaps large freed blocks, so
every update page-faults its tensors in again (each phase reports minor page faults and
system seconds per step).
Each phase runs in its own process so that its peak memory is its own. To show the floor is a real one, the bare phase also reports its achieved FLOP/s
(6 × parameters × tokens for the decoder, 6 × hidden × vocab per sampled token for
the head) next to a plain ``a @ b`` matmul's FLOP/s on the same cores and precision.

    .venv/bin/python benchmarks/learner.py                     # SmolLM2-135M, 16 x 256 tokens
    .venv/bin/python benchmarks/learner.py --model tiny-random --batch 8 --seq-len 128
    .venv/bin/python benchmarks/learner.py --shared-prompt --group-size 8 --prompt-len 128
    .venv/bin/python benchmarks/learner.py --shared-prompt --group-size 8 --ragged \
        --seq-len 108 --prompt-len 44 --dtype float32          # the peer benchmark's shapes

Prints one JSON line per phase and a Markdown table: the GRPO update's seconds per step
over the bare loop's (target <= 1.3) and the bare loop's share of the matmul rate.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import sys
import time
from pathlib import Path


def make_trajectories(batch: int, seq_len: int, group_size: int, seed: int = 0,
                      prompt_len: int = 0, shared_prompt: bool = False, ragged: bool = False):
    """``batch`` two-turn trajectories of exactly ``seq_len`` tokens (a ``prompt_len`` prompt,
    default 1/4; a 16-token observation between the turns), random token ids (the same
    prompt within a group with ``shared_prompt``), rewards 0/1 with variance in each group.
    ``ragged``: each row's last turn is cut to a random length (1 token to all of it), as
    sampled answers end where they end.
    The sampler log-probs are a constant: their values change the update's numbers, not its cost.
    """
    from taurl.types import Trajectory

    rng = random.Random(seed)
    prompt_len, obs_len = prompt_len or seq_len // 4, 16
    prompts: dict[int, list[int]] = {}
    turn_len = (seq_len - prompt_len - obs_len) // 2
    tail = seq_len - prompt_len - obs_len - 2 * turn_len
    out = []
    for i in range(batch):
        mask = [0] * prompt_len + [1] * turn_len + [0] * obs_len + [1] * (turn_len + tail)
        turns = [-1] * prompt_len + [0] * (turn_len + obs_len) + [1] * (turn_len + tail)
        ids = [rng.randrange(100, 40000) for _ in range(seq_len)]
        if shared_prompt:
            ids[:prompt_len] = prompts.setdefault(i // group_size, ids[:prompt_len])
        if ragged:
            n = rng.randint(seq_len - turn_len - tail + 1, seq_len)
            ids, mask, turns = ids[:n], mask[:n], turns[:n]
        reward = float(i % 2)
        out.append(Trajectory(
            token_ids=ids, loss_mask=mask, logprobs=[-1.0 * m for m in mask], turn_ids=turns,
            rewards=[0.0, reward], episode_return=reward, termination="terminated",
            group_id=f"g{i // group_size}",
        ))
    return out


def device_type(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name.split(":")[0]


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def matmul_gflops(device, dtype, n: int = 2048, reps: int = 10) -> float:
    """A plain ``a @ b`` of two n x n matrices: the cores' attainable FLOP/s at this precision."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def run_phase(phase: str, args: argparse.Namespace, queue) -> None:
    import torch

    from taurl.learners import AlgorithmOptions, Learner, LearnerConfig
    from taurl.learners.batch import build_batch, pack_micro_batches
    from taurl.learners.model import autocast
    from taurl.models import resolve_model

    torch.manual_seed(0)
    path = resolve_model(args.model)
    cfg = LearnerConfig(
        algorithm="grpo", options=AlgorithmOptions(kl_coef=args.kl_coef), lr=1e-6,
        dtype=args.dtype, device=args.device, micro_batch_tokens=args.micro_batch_tokens,
        gradient_checkpointing=args.gradient_checkpointing,
        share_prefix=phase.startswith("grpo-shared"),
        cpu_keep_freed_memory=phase != "grpo-shared-unmapped",
    )
    learner = Learner(cfg, path)
    trajs = make_trajectories(args.batch, args.seq_len, args.group_size,
                              prompt_len=args.prompt_len, shared_prompt=args.shared_prompt,
                              ragged=args.ragged)
    if phase in ("grpo-shared-whole", "grpo-shared-buckets"):  # the rows unpacked
        from taurl.learners import forward

        forward.PACK_ROWS[device_type(args.device)] = False
        if phase == "grpo-shared-whole":  # every row padded to the longest, in one decoder call
            forward.BUCKET_CALL_TOKENS[device_type(args.device)] = 10**9
    tokens = sum(len(t.token_ids) for t in trajs)
    device = learner.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    if phase.startswith("grpo"):
        def step() -> None:
            learner.update(trajs)
    else:
        model, opt = learner.model, learner.optimizer
        batch = build_batch(trajs, device)
        micro = pack_micro_batches(list(range(batch.size)), batch.lengths_B.tolist(),
                                   cfg.micro_batch_tokens)
        n_sampled = batch.mask_B_T.sum()

        decoder, head = model.get_decoder(), model.get_output_embeddings()

        def step() -> None:
            model.train()
            opt.zero_grad(set_to_none=True)
            for rows in micro:
                idx, W = batch.rows(rows), batch.width(rows)
                ids, mask = batch.input_ids_B_T[idx, :W], batch.mask_B_T[idx, :W]
                sel = mask[:, 1:] > 0
                with autocast(device, learner.amp_dtype):
                    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1][sel]
                    logits = head(hidden)  # [N, V]: the sampled positions only
                loss = torch.nn.functional.cross_entropy(
                    logits.float(), ids[:, 1:][sel], reduction="sum") / n_sampled
                loss.backward()
            opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / args.steps
    after = resource.getrusage(resource.RUSAGE_SELF)
    extra = {}
    if phase == "bare":
        head_params = model.get_output_embeddings().weight.numel()
        body_params = sum(p.numel() for p in model.parameters()) - head_params
        sampled = int(n_sampled.item())
        flops = 6 * body_params * tokens + 6 * head_params * sampled
        extra = {"achieved_gflops": round(flops / elapsed / 1e9, 1),
                 "matmul_gflops": round(matmul_gflops(device, learner.amp_dtype), 1)}
    queue.put({**extra,
        "phase": phase, "model": args.model, "device": str(device),
        "precision": str(learner.amp_dtype or torch.float32).replace("torch.", ""),
        "tokens": tokens, "seconds_per_step": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "minor_faults_per_step": round((after.ru_minflt - usage.ru_minflt) / args.steps),
        "system_s_per_step": round((after.ru_stime - usage.ru_stime) / args.steps, 2),
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=16, help="trajectories per update")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per trajectory")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=0, help="prompt tokens (0 = seq-len / 4)")
    p.add_argument("--shared-prompt", action="store_true",
                   help="the rows of a group share their prompt, as GRPO's samples do")
    p.add_argument("--ragged", action="store_true",
                   help="rows of different lengths; adds the phases grpo-shared-buckets (unpacked, "
                        "in length buckets) and grpo-shared-whole (every row padded to the longest)")
    p.add_argument("--unmapped-memory", action="store_true",
                   help="adds the phase grpo-shared-unmapped (learner.cpu_keep_freed_memory off)")
    p.add_argument("--micro-batch-tokens", type=int, default=4096)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "float32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--kl-coef", type=float, default=0.0,
                   help="GRPO's KL weight; > 0 adds a reference-model forward (0.04 in the paper)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()

    ctx = mp.get_context("spawn")
    results = {}
    phases = (["bare", "grpo", "grpo-shared"]
              + ["grpo-shared-buckets", "grpo-shared-whole"] * args.ragged
              + ["grpo-shared-unmapped"] * args.unmapped_memory)
    for phase in phases:
        queue = ctx.Queue()
        proc = ctx.Process(target=run_phase, args=(phase, args, queue))
        proc.start()
        results[phase] = queue.get()
        proc.join()
        print(json.dumps(results[phase]), flush=True)
    bare, grpo, shared = results["bare"], results["grpo"], results["grpo-shared"]
    ratio = grpo["seconds_per_step"] / bare["seconds_per_step"]
    print(f"\n| {args.model} {bare['device']} {bare['precision']}, {args.batch} x {args.seq_len} "
          "tokens | tokens/s | s/step | peak memory (MiB) |\n|---|---|---|---|")
    for r in results.values():
        print(f"| {r['phase']} | {r['tokens_per_s']} | {r['seconds_per_step']} | "
              f"{r['peak_memory_mb']} |")
    print(f"\nGRPO update / bare loop = {ratio:.2f}x the seconds per step (target <= 1.3); "
          f"bare loop at {bare['achieved_gflops']} GFLOP/s = "
          f"{100 * bare['achieved_gflops'] / bare['matmul_gflops']:.0f}% of a plain matmul's "
          f"{bare['matmul_gflops']} GFLOP/s; with shared prompts run once, "
          f"{shared['seconds_per_step'] / bare['seconds_per_step']:.2f}x")
    if args.ragged:
        whole, split = results["grpo-shared-whole"], results["grpo-shared-buckets"]
        print(f"the default update: {shared['seconds_per_step']} s/step; unpacked in length "
              f"buckets {split['seconds_per_step']} "
              f"({split['seconds_per_step'] / shared['seconds_per_step']:.2f}x slower), padded to "
              f"the longest in one call {whole['seconds_per_step']} "
              f"({whole['seconds_per_step'] / shared['seconds_per_step']:.2f}x slower)")
    if args.unmapped_memory:
        unmapped = results["grpo-shared-unmapped"]
        print(f"freed memory kept: {shared['seconds_per_step']} s/step, "
              f"{shared['minor_faults_per_step']} faults and {shared['system_s_per_step']} system s "
              f"per step vs {unmapped['seconds_per_step']}, {unmapped['minor_faults_per_step']} and "
              f"{unmapped['system_s_per_step']} unmapped "
              f"({unmapped['seconds_per_step'] / shared['seconds_per_step']:.2f}x faster)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
