"""Arithmetic problems with a ``calculator`` tool: taurl's default training environment.

Each task is an arithmetic question, either a bare expression ("What is 7 + 5?") or a
word problem ("Mia has 7 apples. She buys 5 more. How many apples does she have
now?"). The model may call ``calculator`` any number of times, then answers.

**Answer format** (forgiving, so a small model is scored on arithmetic, not syntax):
the final answer is the last number inside ``<answer>...</answer>`` if the message
has that tag, otherwise the last number in the message. ``1,234`` reads as 1234.
Reward 1.0 if it equals the true result, else 0.0 (plus the tool layer's format
penalties and optional ``tool_call_bonus``, see :class:`~taurl.envs.base.ToolEnv`).

**Splits.** ``train`` draws operands from ``[min_value, max_value]`` and uses one set
of word-problem templates. ``heldout`` differs in kind: other templates (other
stories and phrasings), and every task has at least one operand above
``max_value`` (up to twice it), so it measures generalisation, not memorisation.

**Difficulty** knobs: ``min_value``/``max_value``, ``num_operations`` (1 to 3),
``operations`` (any of ``+-*``), ``style`` (``"expression"``, ``"word"`` or
``"mixed"``). The defaults (one addition of operands in 1..5, bare expression) were
picked so that SmolLM2-135M-Instruct, sampled at temperature 1.0 with the tool prompt
as its system message, solves some tasks but not all: 5 of 24 (21%) in a measurement
where operands up to 20 with ``+-`` gave 1 of 24 (4%); see the README's table.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable

import gymnasium
import numpy as np

from taurl.envs.base import Task, ToolEnv, answer_tag, last_number
from taurl.envs.tools import Tool, format_number
from taurl.errors import ConfigError
from taurl.types import Message

_MAX_EXPRESSION_CHARS = 300
_MAX_ABS_RESULT = 1e100
_MAX_EXPONENT = 100

_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent {right:g} is too large (at most {_MAX_EXPONENT})")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ValueError("division by zero")
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, complex) or abs(value) > _MAX_ABS_RESULT:
            raise ValueError("the result is out of range")
        return value
    raise ValueError(
        f"unsupported syntax {ast.unparse(node)!r}; use numbers, + - * / // % ** and parentheses"
    )


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return the result.

    Args:
        expression: Numbers with + - * / // % ** (or ^) and parentheses, e.g. "12 * (3 + 4)".
    """
    text = expression.strip().rstrip("=").strip()
    if len(text) > _MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression is longer than {_MAX_EXPRESSION_CHARS} characters")
    text = text.replace("×", "*").replace("÷", "/").replace("^", "**")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse {expression!r} as arithmetic ({e.msg})") from None
    return format_number(_evaluate(tree))


CALCULATOR_TOOL = Tool.from_function(calculator, examples={"expression": "12 * (3 + 4)"})

# -- task generation --------------------------------------------------------------------

_SYMBOL = {"+": "+", "-": "-", "*": "*"}

# Word problems: a start sentence with the first quantity, one sentence per operation,
# and a question. "{n}" is the person, "{x}" the item; {a} the first operand, {b} the next.
_TRAIN_STORIES = (
    ("{n} has {a} {x}.", {"+": "{n} buys {b} more {x}.", "-": "{n} gives away {b} {x}.",
                          "*": "Then the number of {x} {n} has becomes {b} times as large."},
     "How many {x} does {n} have now?"),
    ("There are {a} {x} in a basket.", {"+": "Someone adds {b} more {x}.", "-": "{b} {x} are taken out.",
                                        "*": "Then the basket is replaced by {b} baskets just like it."},
     "How many {x} are there now?"),
)
_HELDOUT_STORIES = (
    ("A train carries {a} passengers.", {"+": "At the next station {b} people get on.",
                                         "-": "At the next station {b} people get off.",
                                         "*": "Later the train runs with {b} times as many passengers."},
     "How many passengers are on the train?"),
    ("{n}'s savings account holds {a} dollars.", {"+": "{n} deposits {b} dollars.",
                                                  "-": "{n} withdraws {b} dollars.",
                                                  "*": "The balance then grows to {b} times its size."},
     "How many dollars are in the account?"),
)
_TRAIN_NAMES = ("Mia", "Tom", "Ana", "Leo", "Sara", "Ben")
_HELDOUT_NAMES = ("Priya", "Kofi", "Yuki", "Omar")
_TRAIN_ITEMS = ("apples", "pencils", "marbles", "stickers", "cookies")
_HELDOUT_ITEMS = ("coins",)
_TRAIN_EXPRESSION = ("What is {e}?", "Compute {e}.")
_HELDOUT_EXPRESSION = ("Evaluate the expression {e}.", "Find the value of {e}.")

_INSTRUCTIONS = "Give the final answer as a number inside <answer></answer> tags."


class CalculatorEnv(ToolEnv):
    """Arithmetic questions answered with the help of a ``calculator`` tool.

    Args:
        split: ``"train"`` or ``"heldout"`` (other templates, larger operands).
        style: ``"expression"`` (bare arithmetic), ``"word"`` (word problems) or ``"mixed"``.
        min_value: Smallest operand.
        max_value: Largest train operand (held-out tasks go up to ``2 * max_value``).
        num_operations: Operations per task, 1 to 3.
        operations: Which of ``+ - *`` to use, e.g. ``"+-"``.
        max_turns: Assistant turns before truncation.
        tool_timeout_s: None by default: the calculator runs inline because it finishes in
            bounded time (input <= 300 characters, exponents <= 100, values <= 1e100), which
            keeps a step well under a millisecond.
        **tool_env_kwargs: Options of :class:`~taurl.envs.base.ToolEnv` (``format_penalty``,
            ``tool_call_bonus``, ``max_tool_calls_per_turn``, ``tool_timeout_s``, ``parser``...).
    """

    def __init__(
        self,
        split: str = "train",
        *,
        style: str = "expression",
        min_value: int = 1,
        max_value: int = 5,
        num_operations: int = 1,
        operations: str = "+",
        max_turns: int = 3,
        tool_timeout_s: float | None = None,
        **tool_env_kwargs: object,
    ) -> None:
        super().__init__(
            [CALCULATOR_TOOL], split, max_turns=max_turns, tool_timeout_s=tool_timeout_s,
            **tool_env_kwargs,  # type: ignore[arg-type]
        )
        if style not in ("expression", "word", "mixed"):
            raise ConfigError(f"CalculatorEnv: style must be 'expression', 'word' or 'mixed', got {style!r}")
        for key, value in (("min_value", min_value), ("max_value", max_value), ("num_operations", num_operations)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"CalculatorEnv: {key} must be an int, got {value!r}")
        if not 0 <= min_value < max_value:
            raise ConfigError(
                f"CalculatorEnv: need 0 <= min_value < max_value, got min_value={min_value}, max_value={max_value}"
            )
        if not 1 <= num_operations <= 3:
            raise ConfigError(f"CalculatorEnv: num_operations must be 1, 2 or 3, got {num_operations}")
        if not operations or any(op not in _SYMBOL for op in operations):
            raise ConfigError(f"CalculatorEnv: operations must be a non-empty string of '+', '-', '*', got {operations!r}")
        self.style = style
        self.min_value = min_value
        self.max_value = max_value
        self.num_operations = num_operations
        self.operations = "".join(dict.fromkeys(operations))

    def _operand(self, rng: np.random.Generator, high: int) -> int:
        return int(rng.integers(self.min_value, high + 1))

    def _operands(self, rng: np.random.Generator) -> list[int]:
        """``num_operations + 1`` operands; held-out sets have one above ``max_value``."""
        n = self.num_operations + 1
        values = [self._operand(rng, self.max_value) for _ in range(n)]
        if self.split == "heldout":
            values[int(rng.integers(n))] = int(rng.integers(self.max_value + 1, 2 * self.max_value + 1))
        return values

    def make_task(self, rng: np.random.Generator) -> Task:
        heldout = self.split == "heldout"
        style = self.style if self.style != "mixed" else ("expression", "word")[int(rng.integers(2))]
        values = self._operands(rng)
        ops = [self.operations[int(rng.integers(len(self.operations)))] for _ in range(self.num_operations)]
        if style == "word":
            return self._word_task(rng, values, ops, heldout)
        expression = str(values[0])
        for op, v in zip(ops, values[1:], strict=True):
            expression += f" {_SYMBOL[op]} {v}"
        answer = int(_evaluate(ast.parse(expression, mode="eval")))
        templates = _HELDOUT_EXPRESSION if heldout else _TRAIN_EXPRESSION
        t = int(rng.integers(len(templates)))
        prompt = templates[t].format(e=expression) + " " + _INSTRUCTIONS
        return Task(
            id=f"calc/{self.split}/expr{t}/{expression.replace(' ', '')}",
            prompt=prompt,
            answer=answer,
            privileged_context=f"{expression} = {answer}",
            metadata={"style": "expression", "operations": "".join(ops)},
        )

    def _word_task(self, rng: np.random.Generator, values: list[int], ops: list[str], heldout: bool) -> Task:
        stories = _HELDOUT_STORIES if heldout else _TRAIN_STORIES
        names = _HELDOUT_NAMES if heldout else _TRAIN_NAMES
        items = _HELDOUT_ITEMS if heldout else _TRAIN_ITEMS
        s = int(rng.integers(len(stories)))
        start, steps, question = stories[s]
        fill = {"n": names[int(rng.integers(len(names)))], "x": items[int(rng.integers(len(items)))]}
        total = values[0]
        sentences = [start.format(a=total, **fill)]
        worked = str(total)
        for op, b in zip(ops, values[1:], strict=True):
            if op == "-" and b > total:
                # A story cannot take away more than there is: flip to an addition.
                op = "+"
            sentences.append(steps[op].format(b=b, **fill))
            total = total + b if op == "+" else total - b if op == "-" else total * b
            # Story steps apply in order, so earlier steps are bracketed.
            worked = f"({worked}) {_SYMBOL[op]} {b}" if " " in worked else f"{worked} {_SYMBOL[op]} {b}"
        sentences.append(question.format(**fill))
        return Task(
            id=f"calc/{self.split}/word{s}/{fill['n']}/{fill['x']}/{'.'.join(map(str, values))}/{''.join(ops)}",
            prompt=" ".join(sentences) + " " + _INSTRUCTIONS,
            answer=total,
            privileged_context=f"{worked} = {total}",
            metadata={"style": "word", "operations": "".join(ops)},
        )

    def extract_answer(self, text: str) -> str:
        tagged = answer_tag(text)
        return tagged if tagged is not None else text

    def score(self, task: Task, answer: str) -> bool:
        value = last_number(answer)
        return value is not None and abs(value - float(task.answer)) < 1e-6  # type: ignore[arg-type]


def oracle_policy(env: gymnasium.Env, messages: list[Message]) -> str:
    """Scripted solver: call the calculator on the worked expression, then answer with its result.

    The expression comes from the task's privileged context (the reference solution).
    """
    last = messages[-1]
    if last["role"] == "user" and "<tool_response>" in last["content"]:
        result = last["content"].split("<tool_response>\n", 1)[1].split("\n</tool_response>", 1)[0]
        return f"The calculator says {result}. <answer>{result}</answer>"
    expression = env.unwrapped.task.privileged_context.split(" = ")[0]
    return f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}</tool_call>'


def failing_policy(env: gymnasium.Env, messages: list[Message]) -> str:
    """Scripted wrong answer: the true answer plus one, without calling the tool."""
    return f"<answer>{int(env.unwrapped.task.answer) + 1}</answer>"
