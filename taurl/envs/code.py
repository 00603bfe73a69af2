"""Write a Python function that passes hidden unit tests: ``taurl/Code-v0``.

Each task asks for one function (name, signature, description and two worked
examples; the problems are in :mod:`taurl.envs.code_problems`). The model may call
``run_python`` to execute any program in the sandbox (:mod:`taurl.envs.sandbox`) and see
its output, as often as the turn limit allows, then gives its final answer: a message
without a tool call that holds the function.

**Answer format** (the same rule as ``taurl/Calculator-v0``): the content of the last
``<answer>...</answer>`` if the message has one, otherwise the whole message; inside
it, the last fenced code block (```` ```python ... ``` ````) if there is one,
otherwise the text as it is.

**Reward**: the fraction of hidden tests passed (0.0 to 1.0) — a partial signal for
GRPO groups — and ``success`` only when every test passes. Hidden tests run in the
sandbox too: the answer and a small harness form one program that calls the function on
each hidden test's arguments and prints what it returned (as JSON, tagged with a random
per-call token). The expected values never enter the sandbox: the host compares the
outputs with them (:func:`parse_grade`), so code that forges the harness's line or
overrides ``__eq__`` gains nothing it could not get by computing the answers. A tool or
format error costs ``format_penalty`` as in every :class:`~taurl.envs.base.ToolEnv`.

**Splits** differ in kind: ``train`` draws from the ``strings`` and ``lists``
families, ``heldout`` from ``numbers`` (number theory) and ``grids``.

**Sandbox**: pass one :class:`~taurl.envs.sandbox.Sandbox` to many environments
(``sandbox=``) to share its worker processes; without it each environment starts a
one-worker sandbox on first use and stops it in :meth:`CodeEnv.close`.
"""

from __future__ import annotations

import json
import os
import re
import secrets

import gymnasium
import numpy as np

from taurl.envs.base import Task, ToolEnv, answer_tag
from taurl.envs.code_problems import PROBLEMS, Problem
from taurl.envs.sandbox import Sandbox, SandboxConfig, SandboxLimits, SandboxResult
from taurl.envs.tools import Tool
from taurl.errors import ConfigError
from taurl.types import Message

#: Problems by split, in the fixed order of :data:`PROBLEMS`.
PROBLEMS_BY_SPLIT: dict[str, tuple[Problem, ...]] = {
    split: tuple(p for p in PROBLEMS if p.split == split) for split in ("train", "heldout")
}
_BY_NAME: dict[str, Problem] = {p.name: p for p in PROBLEMS}
_FENCE_RE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)
_RESULT_PREFIX = "__taurl_result__"
#: Examples shown in the prompt; all tests (these included) stay hidden as tests.
_SHOWN_EXAMPLES = 2
_MAX_OUTPUT_CHARS_SHOWN = 1500

_INSTRUCTIONS = (
    "You can run Python code with the run_python tool to test your function before "
    "answering. When you are done, reply without a tool call and give the complete "
    "function inside <answer></answer> tags, as a ```python code block."
)


def extract_code(text: str) -> str:
    """The code in a final answer: ``<answer>`` content (else the whole text), unfenced.

    Inside, the last fenced block (```` ```python ```` or bare ```` ``` ````) wins;
    without a fence the text is taken as code.
    """
    tagged = answer_tag(text)
    body = tagged if tagged is not None else text
    blocks = _FENCE_RE.findall(body)
    return (blocks[-1] if blocks else body).strip("\n")


def _call_repr(name: str, args: list[object]) -> str:
    return f"{name}({', '.join(repr(a) for a in args)})"


def grading_program(problem: Problem, code: str, token: str) -> str:
    """The program that runs ``code`` on the arguments of ``problem``'s hidden tests.

    It holds the arguments only, never the expected values: its last stdout line is
    ``__taurl_result__<token> [out_1, ..., out_n]``, each ``out_i`` the JSON text of the
    function's return value on case i (None when it raised or was not JSON). The host
    compares them with the expected values (:func:`parse_grade`), so the candidate's
    code, which shares this process, can neither see the answers nor bend the
    comparison (an ``__eq__`` that is always true does not survive JSON). A solution in
    which a syntax error sits is a failed run, not a broken harness: it runs as a string.
    """
    args = json.dumps([a for a, _ in problem.cases])
    return f"""\
import json as _json, sys as _sys, traceback as _tb
_ns = {{"__name__": "solution"}}
_outputs = []
_cases = _json.loads({args!r})
try:
    exec(compile({code!r}, "<solution>", "exec"), _ns)
    _fn = _ns[{problem.name!r}]
except BaseException:
    _tb.print_exc()
    _fn = None
if _fn is not None:
    for _args in _cases:
        try:
            _outputs.append(_json.dumps(_fn(*_args)))
        except BaseException:
            _tb.print_exc(limit=-1)
            _outputs.append(None)
_sys.stdout.flush()
print("\\n{_RESULT_PREFIX}{token}", _json.dumps(_outputs))
"""


_NO_VALUE = object()


def _decode(text: object) -> object:
    """A JSON value from the sandbox, or a marker that equals nothing when it is not one."""
    if not isinstance(text, str):
        return _NO_VALUE
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # malformed, too deep, an int too long to read
        return _NO_VALUE


def parse_grade(result: SandboxResult, token: str, problem: Problem) -> tuple[int, int] | None:
    """``(passed, total)``: the outputs a grading run reported, compared here with the
    expected values; None if the harness never reported (killed, cut, or no line)."""
    for line in reversed(result.stdout.splitlines()):
        if not line.startswith(_RESULT_PREFIX + token + " "):
            continue
        outputs = _decode(line.split(" ", 1)[1])
        if not isinstance(outputs, list):
            return None
        # The expected values go through JSON as the outputs did (tuples become lists).
        expected = [json.loads(json.dumps(e)) for _, e in problem.cases]
        passed = sum(
            i < len(outputs) and _same(_decode(outputs[i]), want)
            for i, want in enumerate(expected)
        )
        return passed, len(expected)
    return None


def _same(got: object, want: object) -> bool:
    """JSON values equal as Python compares them (1 == 1.0, True == 1), as before."""
    return got is not _NO_VALUE and got == want


def format_run(result: SandboxResult, limits: SandboxLimits) -> str:
    """What ``run_python`` shows the model: the outcome line, then stdout and stderr."""
    if result.timed_out:
        status = f"killed: the program ran longer than {limits.timeout_s:g} s (wall-clock limit)"
    elif result.killed_reason == "cpu_limit":
        status = f"killed: the program used more than {limits.cpu_s} s of CPU time"
    elif result.killed_reason is not None:
        status = f"failed: {result.killed_reason}"
    else:
        status = f"exit code {result.exit_code}" + ("" if result.ok else " (failed)")
    parts = [status]
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        if text:
            if len(text) > _MAX_OUTPUT_CHARS_SHOWN:
                text = (
                    text[:_MAX_OUTPUT_CHARS_SHOWN]
                    + f"\n[... {len(text) - _MAX_OUTPUT_CHARS_SHOWN} more characters cut]"
                )
            parts.append(f"{name}:\n{text.rstrip()}")
    return "\n".join(parts)


class CodeEnv(ToolEnv):
    """Write a function that passes hidden tests, with a ``run_python`` tool.

    Args:
        split: ``"train"`` (strings, lists) or ``"heldout"`` (numbers, grids).
        sandbox: A shared :class:`Sandbox`; None starts a private one-worker sandbox on
            first use (stopped by :meth:`close`).
        limits: Limits of each ``run_python`` call and of the grading run.
        max_turns: Assistant turns before truncation (tool turns count).
        allow_weak_sandbox: Run even where the sandbox has only its guard mode (no kernel
            isolation); None reads ``TAURL_ALLOW_WEAK_SANDBOX=1``. Otherwise ``reset``
            raises ConfigError there, saying why.
        **tool_env_kwargs: Options of :class:`~taurl.envs.base.ToolEnv`
            (``format_penalty``, ``tool_call_bonus``, ``max_tool_calls_per_turn``, ...).
    """

    def __init__(
        self,
        split: str = "train",
        *,
        sandbox: Sandbox | None = None,
        limits: SandboxLimits | None = None,
        max_turns: int = 4,
        allow_weak_sandbox: bool | None = None,
        **tool_env_kwargs: object,
    ) -> None:
        if sandbox is not None and not isinstance(sandbox, Sandbox):
            raise ConfigError(
                f"CodeEnv: sandbox must be a taurl.envs.sandbox.Sandbox or None, got {sandbox!r}"
            )
        if limits is not None and not isinstance(limits, SandboxLimits):
            raise ConfigError(f"CodeEnv: limits must be a SandboxLimits or None, got {limits!r}")
        self.limits = limits or SandboxLimits()
        if allow_weak_sandbox is None:
            allow_weak_sandbox = os.environ.get("TAURL_ALLOW_WEAK_SANDBOX") == "1"
        self.allow_weak_sandbox = bool(allow_weak_sandbox)
        self._sandbox_checked = False
        self._owns_sandbox = sandbox is None
        self.sandbox = sandbox or Sandbox(SandboxConfig(workers=1, limits=self.limits))
        # The tool layer's own limit is a backstop behind the sandbox's (which kills the
        # process); it must not fire first, or a slow run would read as a tool error.
        run_tool = Tool.from_function(
            self.run_python,
            timeout_s=self.limits.timeout_s + 15,
            examples={"code": "print(sum([1, 2, 3]))"},
        )
        tool_env_kwargs.setdefault("tool_timeout_s", None)
        super().__init__([run_tool], split, max_turns=max_turns, **tool_env_kwargs)  # type: ignore[arg-type]

    def run_python(self, code: str) -> str:
        """Run a Python program in a sandbox and return its exit status, stdout and stderr.

        Args:
            code: A complete Python program; print what you want to see.
        """
        return format_run(self.sandbox.run(code, limits=self.limits), self.limits)

    def on_reset(self, task: Task) -> None:
        super().on_reset(task)
        if not self._sandbox_checked:
            isolation = self.sandbox.isolation  # starts the sandbox
            if "guard" in isolation.split("+") and not self.allow_weak_sandbox:
                raise ConfigError(
                    f"taurl/Code-v0 runs model-written code, and on this machine the sandbox "
                    f"only has its guard mode (isolation={isolation!r}): an in-process check "
                    "that deliberate code can get around, not a boundary. Run as root, or "
                    "enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1"
                    " / user.max_user_namespaces > 0) for kernel isolation; or accept the risk "
                    "with CodeEnv(allow_weak_sandbox=True) or TAURL_ALLOW_WEAK_SANDBOX=1"
                )
            self._sandbox_checked = True

    def make_task(self, rng: np.random.Generator) -> Task:
        pool = PROBLEMS_BY_SPLIT[self.split]
        problem = pool[int(rng.integers(len(pool)))]
        examples = "\n".join(
            f"    {_call_repr(problem.name, args)} == {expected!r}"
            for args, expected in problem.cases[:_SHOWN_EXAMPLES]
        )
        prompt = (
            f"Write a Python function:\n\n{problem.signature}\n\n{problem.description}\n\n"
            f"Examples:\n{examples}\n\n{_INSTRUCTIONS}"
        )
        return Task(
            id=f"code/{self.split}/{problem.name}",
            prompt=prompt,
            answer=problem.name,
            privileged_context=problem.reference,
            metadata={"family": problem.family, "tests": len(problem.cases)},
        )

    def extract_answer(self, text: str) -> str:
        return extract_code(text)

    def score(self, task: Task, answer: str) -> float:
        """Fraction of the hidden tests passed (0.0 when the program could not be graded)."""
        return self.grade(_BY_NAME[str(task.answer)], answer)[0]

    def grade(self, problem: Problem, code: str) -> tuple[float, SandboxResult]:
        """Run ``problem``'s hidden tests on ``code`` in the sandbox: (fraction passed, the run)."""
        token = secrets.token_hex(8)
        result = self.sandbox.run(grading_program(problem, code, token), limits=self.limits)
        report = parse_grade(result, token, problem)
        if report is None or report[1] == 0:
            return 0.0, result
        return report[0] / report[1], result

    def close(self) -> None:
        """Stop the private sandbox (a shared one is left to its owner)."""
        if self._owns_sandbox:
            self.sandbox.close()
        super().close()


def _assistant_turns(messages: list[Message]) -> int:
    return sum(m["role"] == "assistant" for m in messages)


def oracle_policy(env: gymnasium.Env, messages: list[Message]) -> str:
    """Scripted solver: test the reference solution with ``run_python``, then answer with it."""
    task = env.unwrapped.task
    reference = task.privileged_context
    if _assistant_turns(messages) == 0:
        problem = _BY_NAME[task.answer]
        checks = "\n".join(
            f"print({_call_repr(problem.name, args)})" for args, _ in problem.cases[:2]
        )
        call = {"name": "run_python", "arguments": {"code": f"{reference}\n\n{checks}\n"}}
        return f"Let me test my function first.\n<tool_call>{json.dumps(call)}</tool_call>"
    return f"The tests look right.\n<answer>\n```python\n{reference}\n```\n</answer>"


def failing_policy(env: gymnasium.Env, messages: list[Message]) -> str:
    """Scripted wrong answer: a function with the right name that raises on every call."""
    name = env.unwrapped.task.answer
    return f"<answer>\n```python\ndef {name}(*args):\n    raise NotImplementedError\n```\n</answer>"
