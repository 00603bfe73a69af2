"""Sandboxed executions per second of a trivial program (``print(1)``).

Usage::

    python benchmarks/sandbox.py [--runs 400] [--workers 2] [--isolation strongest]

Runs ``--runs`` executions from as many threads as there are workers and prints the
isolation layers that were active and the executions per second. The issue's target is
>= 40/s on 2 cores; a bare ``python3 -I -S -c pass`` start costs ~47 ms on those cores,
so the sandbox forks each execution from a warm worker instead.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from taurl.envs.sandbox import Sandbox, SandboxConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=400, help="executions to time")
    parser.add_argument("--workers", type=int, default=2, help="sandbox worker processes")
    parser.add_argument("--isolation", choices=["strongest", "guard"], default="strongest")
    args = parser.parse_args()
    with Sandbox(SandboxConfig(workers=args.workers, isolation=args.isolation)) as box:
        for _ in range(2 * args.workers):  # warm-up: first forks touch fresh pages
            box.run("print(1)")
        start = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as pool:
            results = list(pool.map(lambda _: box.run("print(1)"), range(args.runs)))
        seconds = time.perf_counter() - start
        failed = sum(not (r.ok and r.stdout == "1\n") for r in results)
        print(f"isolation: {box.isolation}")
        print(f"workers: {args.workers}, runs: {args.runs}, failed: {failed}")
        print(f"executions/s: {args.runs / seconds:.1f}")


if __name__ == "__main__":
    main()
