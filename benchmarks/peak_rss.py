"""Run a command and report the peak resident memory of its process and of its children.

    python benchmarks/peak_rss.py --out peak.json -- taurl train examples/grpo_agent_calculator.yaml

``taurl train`` runs the learner in the main process and vLLM's engine in child
processes, so the two peaks are the trainer's and the engine's. The sum is sampled at
the same instant (the machine's real peak), not added from separate peaks. Sampling
every ``--interval`` seconds can miss a spike shorter than that.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--out", help="write the peaks as JSON here")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command after --")
    proc = subprocess.Popen(cmd)
    root = psutil.Process(proc.pid)
    peak = {"main_gib": 0.0, "children_gib": 0.0, "total_gib": 0.0}
    while proc.poll() is None:
        try:
            main_rss = root.memory_info().rss
            kids = 0
            for child in root.children(recursive=True):
                try:
                    kids += child.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            break
        gib = 1024**3
        peak["main_gib"] = max(peak["main_gib"], main_rss / gib)
        peak["children_gib"] = max(peak["children_gib"], kids / gib)
        peak["total_gib"] = max(peak["total_gib"], (main_rss + kids) / gib)
        time.sleep(args.interval)
    rc = proc.wait()
    result = {k: round(v, 2) for k, v in peak.items()} | {"exit_code": rc, "command": cmd}
    print(json.dumps(result), file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
