"""``check_env``: does an environment keep taurl's contract? And a scripted-episode runner.

In the spirit of ``gymnasium.utils.env_checker.check_env``: it drives the env through
resets and steps and raises :class:`~taurl.errors.EnvError` at the first broken rule,
saying what was expected, what came and the likely cause. Checked:

- ``reset`` returns ``(list of messages, dict)`` with ``task_id`` (str), ``tools``
  (valid OpenAI-format schemas) and a non-empty first observation;
- seeding: the same seed gives the same task and the same transitions; different
  seeds give more than one task (for adapted envs told apart by their first
  observations, not by a ``task_id`` that a hook may build from the seed); resets with the same seed from
  several threads at once give the same task as serial resets (an env that seeds
  Python's global ``random`` fails this: another thread reseeds between its seed and draw);
- ``step`` returns five values: messages, a finite Python ``float``, two Python
  ``bool`` and a dict with int ``tool_calls`` / ``tool_errors`` and, when present, a
  bool ``success``;
- garbage text, malformed JSON in ``<tool_call>``, an unknown tool and bad arguments
  come back as observations (with ``tool_errors`` counted), not exceptions;
- an episode of garbage ends (terminated or truncated) within ``max_steps``;
- ``step`` before ``reset``, after the end, or with a non-str action raises ``EnvError``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import gymnasium

from taurl.envs.adapter import EnvAdapter
from taurl.envs.base import Info
from taurl.envs.spaces import ROLES
from taurl.errors import EnvError
from taurl.types import Message

T = TypeVar("T")

Policy = Callable[[gymnasium.Env, list[Message]], str]
"""A scripted agent: ``(env, conversation so far) -> next assistant text``."""

_GARBAGE = "%%% not an answer, not a tool call <<>> {["


def _fail(what: str) -> EnvError:
    return EnvError(f"check_env: {what}")


def _check_messages(obs: object, where: str, allow_empty: bool) -> list[Message]:
    if not isinstance(obs, list):
        raise _fail(f"{where} observation must be a list of chat messages, got {type(obs).__name__}")
    if not obs and not allow_empty:
        raise _fail(f"{where} observation is empty; the first observation must carry the task")
    for i, m in enumerate(obs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise _fail(
                f"{where} observation[{i}] must be a dict with 'role' in {sorted(ROLES)} and a str "
                f"'content', got {m!r:.200}"
            )
    return obs


def _check_tool_schema(schema: object, i: int) -> str:
    where = f"reset() info['tools'][{i}]"
    if not isinstance(schema, dict) or schema.get("type") != "function" or not isinstance(schema.get("function"), dict):
        raise _fail(f"{where} must be {{'type': 'function', 'function': {{...}}}}, got {schema!r:.200}")
    fn = schema["function"]
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _fail(f"{where}['function']['name'] must be a non-empty str, got {fn.get('name')!r}")
    if not isinstance(fn.get("description"), str):
        raise _fail(f"{where} ({fn['name']}): 'description' must be a str; write a docstring for the tool")
    params = fn.get("parameters")
    if not isinstance(params, dict) or params.get("type") != "object" or not isinstance(params.get("properties"), dict):
        raise _fail(f"{where} ({fn['name']}): 'parameters' must be a JSON schema of type 'object' with 'properties'")
    for pname, prop in params["properties"].items():
        if not isinstance(prop, dict) or not ({"type", "enum", "anyOf"} & set(prop)):
            raise _fail(f"{where} ({fn['name']}): parameter {pname!r} needs a 'type', 'enum' or 'anyOf', got {prop!r}")
    required = params.get("required", [])
    if not isinstance(required, list) or any(r not in params["properties"] for r in required):
        raise _fail(f"{where} ({fn['name']}): 'required' must list names of 'properties', got {required!r}")
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise _fail(f"{where} ({fn['name']}) is not JSON-serialisable: {e}") from e
    return fn["name"]


def _check_reset(env: gymnasium.Env, seed: int) -> tuple[list[Message], Info]:
    result = env.reset(seed=seed)
    if not isinstance(result, tuple) or len(result) != 2:
        raise _fail(f"reset() must return (observation, info), got {type(result).__name__}")
    obs, info = result
    _check_messages(obs, "reset()", allow_empty=False)
    if not isinstance(info, dict):
        raise _fail(f"reset() info must be a dict, got {type(info).__name__}")
    if not isinstance(info.get("task_id"), str):
        raise _fail(f"reset() info['task_id'] must be a str, got {info.get('task_id')!r}")
    tools = info.get("tools")
    if not isinstance(tools, list):
        raise _fail(f"reset() info['tools'] must be a list of tool schemas ([] without tools), got {tools!r:.100}")
    names = [_check_tool_schema(s, i) for i, s in enumerate(tools)]
    if len(set(names)) != len(names):
        raise _fail(f"reset() info['tools'] has duplicate names: {names}")
    pc = info.get("privileged_context")
    if pc is not None and not isinstance(pc, str):
        raise _fail(f"reset() info['privileged_context'] must be a str or None, got {type(pc).__name__}")
    return obs, info


def _check_step(env: gymnasium.Env, action: str) -> tuple[list[Message], float, bool, bool, Info]:
    try:
        result = env.step(action)
    except EnvError:
        raise
    except Exception as e:
        raise _fail(
            f"step({action!r:.80}) raised {type(e).__name__}: {e}; model text of any kind must "
            "become an observation (with a format penalty), never an exception"
        ) from e
    if not isinstance(result, tuple) or len(result) != 5:
        raise _fail(f"step() must return (observation, reward, terminated, truncated, info), got {result!r:.200}")
    obs, reward, terminated, truncated, info = result
    _check_messages(obs, "step()", allow_empty=True)
    if type(reward) is not float or not math.isfinite(reward):
        raise _fail(f"step() reward must be a finite Python float, got {type(reward).__name__} {reward!r}")
    for name, flag in (("terminated", terminated), ("truncated", truncated)):
        if type(flag) is not bool:
            raise _fail(f"step() {name} must be a Python bool, got {type(flag).__name__} {flag!r}")
    if not isinstance(info, dict):
        raise _fail(f"step() info must be a dict, got {type(info).__name__}")
    for key in ("tool_calls", "tool_errors"):
        if type(info.get(key)) is not int:
            raise _fail(f"step() info[{key!r}] must be an int, got {info.get(key)!r}")
    if "success" in info and type(info["success"]) is not bool:
        raise _fail(f"step() info['success'] must be a bool when present, got {info['success']!r}")
    if "error" in info and not isinstance(info["error"], str):
        raise _fail(f"step() info['error'] must be a str when present, got {info['error']!r}")
    if not (terminated or truncated) and not obs:
        raise _fail("step() returned no observation although the episode goes on; the model needs something to answer")
    return obs, reward, terminated, truncated, info


def _expect_env_error(call: Callable[[], object], what: str) -> None:
    try:
        call()
    except EnvError:
        return
    except Exception as e:
        raise _fail(f"{what} raised {type(e).__name__}, expected taurl.errors.EnvError: {e}") from e
    raise _fail(f"{what} did not raise; expected taurl.errors.EnvError")


DISTINCT_TASKS: tuple[str, ...] = ("observation", "task_id", "no")


def _copies(env: gymnasium.Env, make: Callable[[], gymnasium.Env] | None, n: int) -> list[gymnasium.Env]:
    if make is not None:
        return [make() for _ in range(n)]
    spec = env.unwrapped.spec  # a wrapper's spec is a deep copy, None when that fails
    if spec is not None:
        # The spec's kwargs as they are (not deep-copied): a sandbox or a pool can be shared.
        kwargs = {k: v for k, v in spec.kwargs.items() if k != "disable_env_checker"}
        with contextlib.suppress(Exception):  # a spec that cannot be remade: try a copy
            return [gymnasium.make(spec.id, disable_env_checker=True, **kwargs) for _ in range(n)]
    try:
        return [copy.deepcopy(env) for _ in range(n)]
    except Exception as e:
        raise _fail(
            f"cannot make copies of {type(env).__name__} for the concurrent-reset check ({type(e).__name__}: "
            f"{e}); pass make= (a function returning a fresh env)"
        ) from e


def run_concurrently(fn: Callable[[T], None], items: Sequence[T]) -> list[BaseException]:
    """Run ``fn(item)`` for every item, each in its own thread, all released at once.

    A 1 µs switch interval makes the threads interleave inside ``fn`` (a race between a
    global seed and a draw shows within a few hundred resets); it is restored afterwards.
    Returns what the threads raised.
    """
    errors: list[BaseException] = []
    start = threading.Barrier(len(items))

    def run(item: T) -> None:
        try:
            start.wait()
            fn(item)
        except BaseException as e:  # noqa: BLE001 - returned to the caller's thread
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        pool = [threading.Thread(target=run, args=(item,)) for item in items]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    return errors


def _check_concurrent_resets(
    env: gymnasium.Env, seeds: Sequence[int], make: Callable[[], gymnasium.Env] | None, threads: int, rounds: int
) -> None:
    """Reset ``threads`` copies at once with the same seeds; every reset must match the serial one."""
    serial = {seed: _check_reset(env, seed) for seed in seeds}
    envs = _copies(env, make, threads)
    mismatches: list[str] = []

    def worker(copy_: gymnasium.Env) -> None:
        for _ in range(rounds):
            for seed in seeds:
                obs, info = copy_.reset(seed=seed)
                if obs != serial[seed][0] or info.get("task_id") != serial[seed][1]["task_id"]:
                    mismatches.append(f"seed {seed}: {info.get('task_id')!r} instead of {serial[seed][1]['task_id']!r}")

    try:
        errors = run_concurrently(worker, envs)
    finally:
        for e in envs:
            e.close()
    if errors:
        raise _fail(f"reset() raised in a thread: {type(errors[0]).__name__}: {errors[0]}") from errors[0]
    if mismatches:
        if isinstance(env.unwrapped, EnvAdapter):
            advice = (
                "the wrapped env likely seeds Python's or NumPy's global random state in reset(); "
                "build the adapter with global_random=True (or None to detect it), and make the "
                "env under taurl.envs.global_random_lock() if its constructor draws from it"
            )
        else:
            advice = "keep all random state on the instance: draw only from self.np_random, never the random module"
        raise _fail(
            f"{len(mismatches)} of {threads * rounds * len(seeds)} resets from {threads} threads gave another "
            f"task than a serial reset with the same seed (first: {mismatches[0]}); {advice}"
        )


def check_env(
    env: gymnasium.Env,
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4, 5, 6, 7),
    max_steps: int = 200,
    distinct_tasks: str | None = None,
    make: Callable[[], gymnasium.Env] | None = None,
    threads: int = 8,
    rounds: int = 4,
) -> None:
    """Check ``env`` against the taurl environment contract; raise EnvError at the first problem.

    ``env`` should be freshly made (the step-before-reset rule is checked only if it
    has not been reset yet). It is reset several times; close it yourself afterwards.

    Args:
        env: The environment (made with ``gymnasium.make`` or constructed directly).
        seeds: Seeds to reset with; at least two of them must give different tasks.
        max_steps: A garbage-only episode must end within this many steps.
        distinct_tasks: How different seeds must differ: ``"observation"`` (their first
            observations), ``"task_id"`` (for hidden tasks, e.g. a secret number the first
            observation does not show) or ``"no"`` (a single-task env, e.g. a board game).
            None: ``"observation"`` for an :class:`~taurl.envs.adapter.EnvAdapter` (whose ids
            a hook may build from anything), ``"task_id"`` for envs naming their own tasks.
        make: Makes the fresh copies reset from several threads at once (default: from
            the env's spec, else ``copy.deepcopy(env)``).
        threads: Threads of the concurrent-reset check (0 skips it).
        rounds: Times each thread resets with each seed.
    """
    if not isinstance(env, gymnasium.Env):
        raise _fail(f"expected a gymnasium.Env, got {type(env).__name__}")
    if len(seeds) < 2:
        raise _fail(f"seeds must hold at least two seeds to compare tasks, got {list(seeds)}")
    if distinct_tasks is not None and distinct_tasks not in DISTINCT_TASKS:
        raise _fail(f"distinct_tasks must be one of {DISTINCT_TASKS} or None, got {distinct_tasks!r}")
    base = env.unwrapped
    adapted = isinstance(base, EnvAdapter)
    if distinct_tasks is None:
        distinct_tasks = "observation" if adapted else "task_id"
    if getattr(base, "_np_random", None) is None and getattr(base, "task", None) is None:
        _expect_env_error(lambda: env.step("hello"), "step() before reset()")

    obs_a, info_a = _check_reset(env, seeds[0])
    obs_b, info_b = _check_reset(env, seeds[0])
    if obs_a != obs_b or info_a["task_id"] != info_b["task_id"]:
        advice = (
            "the wrapped env does not reproduce its task from the seed; check that its reset() "
            "takes the seed and seeds everything it draws from"
            if adapted else "draw the task only from self.np_random"
        )
        raise _fail(
            f"reset(seed={seeds[0]}) twice gave different tasks ({info_a['task_id']!r} vs "
            f"{info_b['task_id']!r}); {advice}"
        )
    firsts = {json.dumps(obs_a, sort_keys=True)}
    task_ids = {info_a["task_id"]}
    for seed in seeds[1:]:
        obs, info = _check_reset(env, seed)
        firsts.add(json.dumps(obs, sort_keys=True))
        task_ids.add(info["task_id"])
    if distinct_tasks == "observation" and len(firsts) < 2:
        advice = (
            "different seeds must give different tasks; if the task is hidden (a secret the first observation does not show), give the adapter "
            "a task_id= function that reads it and pass distinct_tasks='task_id'; if the env has one "
            "task (a board game), pass distinct_tasks='no'"
            if adapted else "different seeds must give different tasks"
        )
        what = f"task {info_a['task_id']!r}" if len(task_ids) == 1 else f"{len(task_ids)} task ids"
        raise _fail(f"seeds {list(seeds)} all gave {what} with the same first observation ({obs_a!r:.120}); {advice}")
    if distinct_tasks == "task_id" and len(task_ids) < 2:
        raise _fail(f"seeds {list(seeds)} all gave task {task_ids.pop()!r}; different seeds must give different tasks")
    if distinct_tasks == "observation" and adapted and len(task_ids) < len(firsts):
        raise _fail(
            f"{len(firsts)} different first observations came with only {len(task_ids)} task ids; "
            "a task id must name what the observation poses"
        )
    if threads > 0:
        _check_concurrent_resets(env, seeds, make, threads, rounds)

    # Malformed and wrong tool calls become observations; the same seed replays identically.
    actions = [_GARBAGE]
    tool_names = [s["function"]["name"] for s in info_a["tools"]]
    if tool_names:
        actions = [
            f'<tool_call>{{"name": "{tool_names[0]}", "arguments": {{"x": </tool_call>',
            '<tool_call>{"name": "__no_such_tool__", "arguments": {}}</tool_call>',
            f'<tool_call>{{"name": "{tool_names[0]}", "arguments": {{"__no_such_argument__": 1}}}}</tool_call>',
        ]
    transcripts = []
    for _ in range(2):
        _check_reset(env, seeds[0])
        transcript = []
        for action in actions:
            obs, reward, terminated, truncated, info = _check_step(env, action)
            transcript.append((obs, reward, terminated, truncated))
            if tool_names and info["tool_errors"] < 1:
                raise _fail(
                    f"step({action!r}) reported tool_errors={info['tool_errors']}; a malformed call, "
                    "an unknown tool or a bad argument must count as a tool error"
                )
            if tool_names and not (terminated or truncated) and "Error" not in "".join(m["content"] for m in obs):
                raise _fail(f"step({action!r}) gave no readable error observation; got {obs!r:.200}")
            if terminated or truncated:
                break
        transcripts.append(transcript)
    if transcripts[0] != transcripts[1]:
        raise _fail(f"the same seed and actions gave different transitions:\n{transcripts[0]!r:.300}\n{transcripts[1]!r:.300}")

    # A garbage-only episode ends, and the env refuses to go on afterwards.
    _check_reset(env, seeds[1])
    for _ in range(max_steps):
        _, _, terminated, truncated, _ = _check_step(env, _GARBAGE)
        if terminated or truncated:
            break
    else:
        raise _fail(f"an episode of garbage actions did not end within {max_steps} steps; set a turn limit (truncation)")
    _expect_env_error(lambda: env.step("hello"), "step() after the episode ended")
    _check_reset(env, seeds[2 % len(seeds)])
    _expect_env_error(lambda: env.step(12345), "step() with a non-str action")  # type: ignore[arg-type]


# -- scripted episodes -----------------------------------------------------------------


@dataclass
class EpisodeResult:
    """One scripted episode: the conversation, per-turn rewards and how it ended."""

    task_id: str
    messages: list[Message]
    rewards: list[float]
    terminated: bool
    truncated: bool
    success: bool | None
    steps: int
    seconds: float
    error: str | None = None  # "ExceptionType: message" if the env or policy crashed
    infos: list[Info] = field(default_factory=list)

    @property
    def episode_return(self) -> float:
        return sum(self.rewards)


def run_episode(env: gymnasium.Env, policy: Policy, seed: int | None = None, max_steps: int = 1000) -> EpisodeResult:
    """Play one episode with a scripted policy; a crash is recorded in ``error``, not raised.

    Args:
        env: The environment.
        policy: ``(env, messages) -> action``; e.g. a module's ``oracle_policy``.
        seed: Reset seed.
        max_steps: Safety cap on steps (the env's own turn limit normally ends it first).
    """
    start = time.perf_counter()
    messages: list[Message] = []
    rewards: list[float] = []
    infos: list[Info] = []
    task_id = ""
    terminated = truncated = False
    success: bool | None = None
    try:
        obs, info = env.reset(seed=seed)
        task_id = str(info.get("task_id", ""))
        messages.extend(obs)
        for _ in range(max_steps):
            action = policy(env, messages)
            messages.append({"role": "assistant", "content": action})
            obs, reward, terminated, truncated, info = env.step(action)
            messages.extend(obs)
            rewards.append(reward)
            infos.append(info)
            if "success" in info:
                success = info["success"]
            if terminated or truncated:
                break
    except Exception as e:  # noqa: BLE001  reported on this episode so concurrent episodes carry on
        return EpisodeResult(task_id, messages, rewards, terminated, truncated, success,
                             len(rewards), time.perf_counter() - start, f"{type(e).__name__}: {e}", infos)
    return EpisodeResult(task_id, messages, rewards, terminated, truncated, success,
                         len(rewards), time.perf_counter() - start, None, infos)
