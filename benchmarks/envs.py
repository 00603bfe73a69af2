"""Steps per second of each built-in environment, driven by its scripted oracle agent.

    python benchmarks/envs.py                  # every env, 3 s each, Markdown table
    python benchmarks/envs.py --seconds 10 --env taurl/SQL-v0 --json out.json

One env instance, one thread, the env's ``oracle_policy`` choosing every action: the
figure is the environment's own cost per step (task generation on reset, parsing,
tool execution, scoring), i.e. an upper bound on what it adds to a rollout. For
Code-v0 every step runs the sandbox once (the oracle tests its solution with
``run_python``, then the answer is graded), so its steps/s are sandboxed executions/s.
Code-v0 and Web-v0 are included when their modules import on this machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from collections.abc import Callable

import gymnasium

import taurl.envs  # noqa: F401  (registers the ids)

#: env id -> (module with oracle_policy, target steps/s from the project's requirements)
ENVS: dict[str, tuple[str, float]] = {
    "taurl/Calculator-v0": ("taurl.envs.calculator", 1000.0),
    "taurl/SQL-v0": ("taurl.envs.sql", 1000.0),
    "taurl/GuessNumber-v0": ("taurl.envs.game", 1000.0),
    "taurl/Code-v0": ("taurl.envs.code", 40.0),
    "taurl/Web-v0": ("taurl.envs.web", 0.0),
}


def bench(env_id: str, policy: Callable, seconds: float) -> dict[str, float | int | str]:
    """Run oracle episodes on one instance for about ``seconds``; return counts and rates."""
    env = gymnasium.make(env_id)
    try:
        steps = episodes = successes = tool_calls = 0
        seed = 0
        env.reset(seed=seed)  # warm-up: first-use costs (imports, servers, sandbox workers)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            obs, _ = env.reset(seed=seed)
            messages = list(obs)
            done = False
            while not done:
                action = policy(env, messages)
                messages.append({"role": "assistant", "content": action})
                obs, _, terminated, truncated, info = env.step(action)
                messages.extend(obs)
                steps += 1
                tool_calls += info["tool_calls"]
                done = terminated or truncated
            successes += bool(info.get("success"))
            episodes += 1
            seed += 1
        elapsed = time.perf_counter() - start
    finally:
        env.close()
    return {
        "env": env_id,
        "steps": steps,
        "episodes": episodes,
        "seconds": round(elapsed, 3),
        "steps_per_s": round(steps / elapsed, 1),
        "episodes_per_s": round(episodes / elapsed, 1),
        "tool_calls_per_s": round(tool_calls / elapsed, 1),
        "success_rate": round(successes / episodes, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per environment")
    parser.add_argument("--env", action="append", choices=sorted(ENVS), help="only these envs (repeatable)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    rows = []
    for env_id in args.env or list(ENVS):
        module_name, target = ENVS[env_id]
        try:
            policy = importlib.import_module(module_name).oracle_policy
        except ImportError as e:
            print(f"skipping {env_id}: {module_name} does not import ({e})")
            continue
        row = bench(env_id, policy, args.seconds)
        row["target_steps_per_s"] = target
        rows.append(row)

    print(f"\nscripted oracle agent, one instance, one thread; {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}\n")
    print("| env | steps/s | target | episodes/s | tool calls/s | oracle success |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        target = f">= {r['target_steps_per_s']:g}" if r["target_steps_per_s"] else "-"
        print(f"| {r['env']} | {r['steps_per_s']:,.0f} | {target} | {r['episodes_per_s']:,.0f} | "
              f"{r['tool_calls_per_s']:,.0f} | {r['success_rate']:.0%} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
