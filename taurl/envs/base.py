"""Base classes for multi-turn text environments and tool-use environments.

The contract (every taurl environment keeps it; :func:`taurl.envs.check_env` checks it):

``reset(seed=None, options=None) -> (observation, info)``
    ``observation`` is a list of chat messages (``{"role", "content"}`` dicts) that
    starts the conversation and carries the task. ``info`` holds ``"task_id"``
    (str), ``"tools"`` (OpenAI-format JSON schemas, ``[]`` without tools),
    ``"split"``, and ``"privileged_context"`` (str or None: e.g. the reference
    solution, for a distillation teacher; never shown to the policy). The same seed
    gives the same task; ``seed=None`` continues the env's random stream.

``step(action: str) -> (observation, reward, terminated, truncated, info)``
    ``action`` is the assistant's whole message text. ``observation`` holds the
    messages to append after it (``[]`` once the episode is over). ``reward`` is a
    Python float, this turn's reward; the episode's return is the sum over turns.
    ``terminated`` means the task reached an end state (answered, solved, lost);
    ``truncated`` means the turn limit cut it off (``info["truncation"] ==
    "max_turns"``). ``info`` holds ``"success"`` (bool, once known),
    ``"tool_calls"`` and ``"tool_errors"`` (ints, this turn) and ``"error"`` (str,
    what went wrong in this turn, when something did). Whatever the model writes,
    ``step`` does not raise: bad text is an observation plus a format penalty.
    Calling ``step`` before ``reset``, after the episode ended, or with a non-string
    action is a caller bug and raises :class:`~taurl.errors.EnvError`.

Each environment has a ``"train"`` and a ``"heldout"`` split (pass ``split=`` to the
constructor or to ``gymnasium.make``) and keeps all its state on the instance, so
many instances can run in parallel threads. Errors inside the environment's own
code (not the model's) propagate out of ``step``; the rollout runner records them
on that episode (see :func:`taurl.envs.checker.run_episode` for the scripted
equivalent).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, SupportsFloat, cast

import gymnasium
import numpy as np

from taurl.envs.spaces import MessagesSpace, TextSpace
from taurl.envs.tool_execution import call_tool, format_tool_error, format_tool_response
from taurl.envs.tool_parsing import TOOL_CALL_PARSERS, ToolCallParser
from taurl.envs.tools import FINAL_ANSWER_TOOL, Tool, ToolSchema, Toolset, as_tool, final_answer
from taurl.errors import ConfigError, EnvError
from taurl.types import JSONValue, Message

SPLITS: tuple[str, ...] = ("train", "heldout")

Info = dict[str, JSONValue]
"""The ``info`` dict of ``reset`` and ``step``."""


@dataclass(frozen=True)
class Task:
    """One task of a split: what the model is asked and what counts as solved."""

    id: str  # stable across runs: the same task always gets the same id
    prompt: str  # the user message that poses the task
    answer: JSONValue = None  # the reference answer, for the env's scorer
    privileged_context: str | None = None  # e.g. a worked solution, for a teacher; never shown to the policy
    metadata: dict[str, JSONValue] = field(default_factory=dict)  # family, difficulty, ...


@dataclass
class Turn:
    """What :meth:`TextEnv.turn` returns for one action (the base class adds truncation)."""

    messages: list[Message]  # the observation to append ([] when the episode ends)
    reward: float  # this turn's reward
    terminated: bool  # the task reached an end state
    info: Info = field(default_factory=dict)  # merged into step()'s info


def user(content: str) -> Message:
    """A ``{"role": "user", "content": content}`` message."""
    return {"role": "user", "content": content}


_ANSWER_RE = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def answer_tag(text: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` in ``text`` (closing tag optional), else None."""
    found = _ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (``1,234`` and ``-3.5`` read as numbers), else None."""
    found = _NUMBER_RE.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def _check_split(split: str, cls_name: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"{cls_name}: split must be one of {SPLITS}, got {split!r}")
    return split


class TextEnv(gymnasium.Env[list, str]):
    """A multi-turn text environment: messages in, assistant text out.

    Subclasses implement :meth:`make_task` (or set :attr:`tasks`) and :meth:`turn`;
    this class handles seeding, the turn limit, order checks and the info keys.

    Args:
        split: ``"train"`` or ``"heldout"``.
        max_turns: Assistant turns before the episode is truncated.
        system_prompt: If given, the first observation starts with this system message.
    """

    metadata: ClassVar[dict[str, JSONValue]] = {"render_modes": []}
    #: Optional fixed task lists per split; the default :meth:`make_task` draws from them.
    tasks: ClassVar[Mapping[str, Sequence[Task]]] = {}

    def __init__(self, split: str = "train", *, max_turns: int = 4, system_prompt: str | None = None) -> None:
        name = type(self).__name__
        self.split = _check_split(split, name)
        if not isinstance(max_turns, int) or isinstance(max_turns, bool) or max_turns < 1:
            raise ConfigError(f"{name}: max_turns must be an int >= 1, got {max_turns!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ConfigError(f"{name}: system_prompt must be a string or None, got {type(system_prompt).__name__}")
        self.max_turns = max_turns
        self.system_prompt = system_prompt
        self.observation_space = MessagesSpace()
        self.action_space = TextSpace()
        self.task: Task | None = None
        self.turn_index = 0  # assistant turns taken in this episode
        self.done = True  # no episode in progress until reset()

    # -- subclass hooks ----------------------------------------------------------------

    def make_task(self, rng: np.random.Generator) -> Task:
        """Draw the episode's task from ``rng`` (already seeded by ``reset``).

        The default picks uniformly from ``self.tasks[self.split]``; generated tasks
        override this. Must depend on nothing but ``rng`` and the constructor's
        settings, so that a seed reproduces its task.
        """
        pool = self.tasks.get(self.split)
        if not pool:
            raise NotImplementedError(
                f"{type(self).__name__} has no tasks for split {self.split!r}: set the class "
                "attribute `tasks = {'train': [...], 'heldout': [...]}` or override make_task()"
            )
        return pool[int(rng.integers(len(pool)))]

    def first_messages(self, task: Task) -> list[Message]:
        """The first observation: the system prompt (if any) and the task prompt as a user message."""
        messages: list[Message] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append(user(task.prompt))
        return messages

    def turn(self, action: str) -> Turn:
        """Advance the episode by one assistant message. Must not raise on any text."""
        raise NotImplementedError(f"{type(self).__name__} must implement turn(action) -> Turn")

    def tool_schemas(self) -> list[ToolSchema]:
        """JSON schemas of the tools this env offers (none here)."""
        return []

    # -- gymnasium API -----------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, JSONValue] | None = None
    ) -> tuple[list[Message], Info]:
        """Start an episode; see the module docstring for what comes back."""
        super().reset(seed=seed)
        self.task = self.make_task(self.np_random)
        self.turn_index = 0
        self.done = False
        self.on_reset(self.task)
        info: Info = {
            "task_id": self.task.id,
            "tools": self.tool_schemas(),
            "split": self.split,
            "privileged_context": self.task.privileged_context,
        }
        return self.first_messages(self.task), info

    def on_reset(self, task: Task) -> None:
        """Reset per-episode state for ``task`` (called by ``reset`` before the first observation)."""

    def step(self, action: str) -> tuple[list[Message], float, bool, bool, Info]:
        """Take one assistant turn; see the module docstring for what comes back."""
        if self.task is None:
            raise EnvError(f"{type(self).__name__}.step() called before reset(); call env.reset(seed=...) first")
        if self.done:
            raise EnvError(
                f"{type(self).__name__}.step() called after the episode ended (terminated or "
                "truncated); call env.reset() to start a new one"
            )
        if not isinstance(action, str):
            raise EnvError(
                f"{type(self).__name__}.step() expects the assistant's text (str), got "
                f"{type(action).__name__}; decode the sampled tokens before stepping"
            )
        self.turn_index += 1
        result = self.turn(action)
        reward = float(result.reward)
        if not math.isfinite(reward):
            raise EnvError(f"{type(self).__name__}.turn() returned a non-finite reward {result.reward!r}")
        terminated = bool(result.terminated)
        truncated = not terminated and self.turn_index >= self.max_turns
        info = {"turn": self.turn_index, "tool_calls": 0, "tool_errors": 0}
        info.update(result.info)
        messages = result.messages
        if truncated:
            info["truncation"] = "max_turns"
            info.setdefault("success", False)
            messages = []
        self.done = terminated or truncated
        return messages, reward, terminated, truncated, info


ScoreFn = Callable[[Task, str], SupportsFloat | bool]


class ToolEnv(TextEnv):
    """A tool-use environment: the model calls tools, then gives a final answer that is scored.

    A turn whose text contains tool calls (or malformed attempts at one) is a tool
    turn: up to ``max_tool_calls_per_turn`` calls run, their results come back in
    one user message of ``<tool_response>`` blocks, and the episode goes on. A turn
    without any is the final answer: :meth:`extract_answer` pulls the answer out and
    :meth:`score` rates it, ending the episode.

    What counts as a tool call is the ``parser``'s decision. The default, ``"auto"``
    (:class:`~taurl.envs.tool_parsing.LenientToolCallParser` bound to this env's tool
    names), reads ``<tool_call>`` blocks and also the tag-less JSON small models
    write: a message that is a JSON call object, or ```` ```json ```` fences holding
    one; JSON that does not name one of the env's tools stays a final answer.
    ``"tags"`` reads ``<tool_call>`` blocks only (strict); any object with a
    ``parse(text) -> (calls, errors)`` method plugs in another format. The name works
    as an env kwarg, e.g. ``env_kwargs: {parser: tags}`` in a YAML config.

    With ``answer_tool=True`` the env also offers a ``final_answer`` tool: calling it
    *is* the final answer (its ``answer`` argument is scored and the episode ends), as
    with a ``submit`` tool in agent benchmarks. Models trained on function calling often
    finish that way rather than in plain text; a plain-text final answer still works.
    Calls before ``final_answer`` in the same message run (their errors count), calls
    after it do not.

    Rewards: the final turn earns ``score``; every turn with a failed call (malformed
    JSON, unknown tool, bad arguments, a tool that raised or timed out, calls over the
    per-turn limit) costs ``format_penalty`` once; the first turn with a successful
    call earns ``tool_call_bonus`` (0 by default: a shaping option).

    Subclass it with a task source (:attr:`tasks` or :meth:`make_task`), the tools
    (passed to ``__init__``) and :meth:`score`.

    Args:
        tools: Typed functions (see :mod:`taurl.envs.tools`), :class:`Tool` objects, or
            toolsets (:class:`~taurl.envs.tools.Toolset`, e.g. an MCP server's tools:
            :class:`~taurl.envs.mcp.MCPToolset`), whose tools are offered and which
            :meth:`close` closes.
        split: ``"train"`` or ``"heldout"``.
        max_turns: Assistant turns before truncation.
        max_tool_calls_per_turn: Calls executed per turn; further ones are errors.
        tool_timeout_s: Time limit per call (None: no limit, calls run inline).
        format_penalty: Subtracted once in a turn that has any failed call (>= 0).
        tool_call_bonus: Added once per episode, on the first turn with a successful call (>= 0).
        success_threshold: A final reward at or above this counts as success.
        max_tool_output_chars: Tool outputs are cut to this many characters.
        answer_tool: Offer the ``final_answer`` tool, whose call ends the episode with its
            ``answer`` scored like a plain-text final answer.
        parser: How tool calls are found in text: ``"auto"`` (default; tags, JSON fences
            or a bare JSON call to one of ``tools``), ``"tags"`` (``<tool_call>`` blocks
            only), or a :class:`~taurl.envs.tool_parsing.ToolCallParser` object. None means
            the default.
        system_prompt: Optional system message at the start of the first observation.
    """

    _toolsets: Sequence[Toolset] = ()  # set first thing in __init__; () for a half-built env

    def __init__(
        self,
        tools: Sequence[Tool | Callable[..., object] | Toolset],
        split: str = "train",
        *,
        max_turns: int = 4,
        max_tool_calls_per_turn: int = 4,
        tool_timeout_s: float | None = 10.0,
        format_penalty: float = 0.1,
        tool_call_bonus: float = 0.0,
        success_threshold: float = 1.0,
        max_tool_output_chars: int = 2000,
        answer_tool: bool = False,
        parser: ToolCallParser | str | None = "auto",
        system_prompt: str | None = None,
    ) -> None:
        # First: a toolset already holds what close() must release (an MCP server's
        # process), also when the checks below refuse the configuration.
        self._toolsets = [t for t in tools if isinstance(t, Toolset)]
        try:
            super().__init__(split, max_turns=max_turns, system_prompt=system_prompt)
            name = type(self).__name__
            if not isinstance(max_tool_calls_per_turn, int) or max_tool_calls_per_turn < 1:
                raise ConfigError(f"{name}: max_tool_calls_per_turn must be an int >= 1, got {max_tool_calls_per_turn!r}")
            if tool_timeout_s is not None and not (isinstance(tool_timeout_s, (int, float)) and tool_timeout_s > 0):
                raise ConfigError(f"{name}: tool_timeout_s must be a number > 0 or None (no limit), got {tool_timeout_s!r}")
            for key, value in (("format_penalty", format_penalty), ("tool_call_bonus", tool_call_bonus)):
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
                    raise ConfigError(f"{name}: {key} must be a finite number >= 0, got {value!r} (0 turns it off)")
            if not isinstance(max_tool_output_chars, int) or max_tool_output_chars < 16:
                raise ConfigError(f"{name}: max_tool_output_chars must be an int >= 16, got {max_tool_output_chars!r}")
            if parser is None:
                parser = "auto"
            if isinstance(parser, str):
                if parser not in TOOL_CALL_PARSERS:
                    raise ConfigError(
                        f"{name}: parser must be one of {sorted(TOOL_CALL_PARSERS)} or an object with a "
                        f"parse(text) -> (calls, errors) method, got {parser!r}"
                    )
            elif not callable(getattr(parser, "parse", None)):
                raise ConfigError(
                    f"{name}: parser must have a parse(text) -> (calls, errors) method, or be one of "
                    f"{sorted(TOOL_CALL_PARSERS)}, got {parser!r}"
                )
            if not isinstance(answer_tool, bool):
                raise ConfigError(f"{name}: answer_tool must be true or false, got {answer_tool!r}")
            self.answer_tool = answer_tool
            self.tools: dict[str, Tool] = {}
            offered = [x for t in tools for x in (t.tools if isinstance(t, Toolset) else [t])]
            if answer_tool and any(as_tool(t).name == FINAL_ANSWER_TOOL.name for t in offered):
                raise ConfigError(
                    f"{name}: a tool is already named {FINAL_ANSWER_TOOL.name!r}, and answer_tool=True "
                    "adds taurl's own; rename your tool or set answer_tool=False"
                )
            for t in [*offered, FINAL_ANSWER_TOOL] if answer_tool else offered:
                tool = as_tool(t)
                if tool.name in self.tools:
                    raise ConfigError(f"{name}: two tools are named {tool.name!r}; tool names must be unique")
                self.tools[tool.name] = tool
            self.max_tool_calls_per_turn = max_tool_calls_per_turn
            self.tool_timeout_s = tool_timeout_s
            self.format_penalty = float(format_penalty)
            self.tool_call_bonus = float(tool_call_bonus)
            self.success_threshold = float(success_threshold)
            self.max_tool_output_chars = max_tool_output_chars
            # Built after the tools: "auto" needs their names to tell calls from JSON answers.
            self.parser: ToolCallParser = (
                TOOL_CALL_PARSERS[parser](self.tools.keys()) if isinstance(parser, str) else parser
            )
            self._schemas = [t.schema for t in self.tools.values()]
            self._bonus_paid = False
        except BaseException:
            self._close_toolsets()  # not close(): a subclass's may need what its __init__ sets
            raise

    def tool_schemas(self) -> list[ToolSchema]:
        return list(self._schemas)

    def close(self) -> None:
        """Close the toolsets among the tools (e.g. stop an MCP server); safe to call twice."""
        self._close_toolsets()
        super().close()

    def _close_toolsets(self) -> None:
        for toolset in self._toolsets:
            toolset.close()

    def on_reset(self, task: Task) -> None:
        self._bonus_paid = False

    # -- subclass hooks ----------------------------------------------------------------

    def extract_answer(self, text: str) -> str:
        """The final answer in a message without tool calls: ``<answer>`` content if present, else the whole text stripped."""
        tagged = answer_tag(text)
        return tagged if tagged is not None else text.strip()

    def score(self, task: Task, answer: str) -> SupportsFloat | bool:
        """Rate the final answer: a reward (float) or a verdict (bool: 1.0 / 0.0)."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(task, answer)")

    # -- the turn ----------------------------------------------------------------------

    def turn(self, action: str) -> Turn:
        calls, parse_errors = self.parser.parse(action)
        if not calls and not parse_errors:
            return self._final_turn(action)
        errors = list(parse_errors)
        blocks: list[str] = [format_tool_error(e) for e in parse_errors]
        executed = calls[: self.max_tool_calls_per_turn]
        skipped = len(calls) - len(executed)
        ok = 0
        for call in executed:
            result = call_tool(
                self.tools, call, timeout_s=self.tool_timeout_s, max_output_chars=self.max_tool_output_chars
            )
            if self.answer_tool and call.name == FINAL_ANSWER_TOOL.name and not result.error:
                # The argument itself, not the tool's output (which is cut to max_tool_output_chars).
                final = self._final_turn(final_answer(**call.arguments))  # type: ignore[arg-type]
                penalty = -self.format_penalty if errors else 0.0
                info = {**final.info, "tool_calls": len(calls) + len(parse_errors), "tool_errors": len(errors)}
                if errors:
                    info["error"] = "; ".join(errors)
                return Turn([], final.reward + penalty, True, info)
            blocks.append(format_tool_response(result))
            if result.error:
                errors.append(result.content.removeprefix("Error: "))
            else:
                ok += 1
        if skipped:
            msg = (f"only {self.max_tool_calls_per_turn} tool calls run per turn; the last {skipped} "
                   "were ignored, call them in the next turn")
            errors.append(msg)
            blocks.append(format_tool_error(msg))
        reward = -self.format_penalty if errors else 0.0
        if ok and not self._bonus_paid:
            reward += self.tool_call_bonus
            self._bonus_paid = True
        info: Info = {"tool_calls": len(calls) + len(parse_errors), "tool_errors": len(errors)}
        if errors:
            info["error"] = "; ".join(errors)
        return Turn([user("\n".join(blocks))], reward, False, info)

    def _final_turn(self, action: str) -> Turn:
        task = cast(Task, self.task)  # step() has checked that an episode is running
        verdict = self.score(task, self.extract_answer(action))
        reward = float(verdict)
        success = bool(verdict) if isinstance(verdict, bool) else reward >= self.success_threshold
        return Turn([], reward, True, {"success": success})


