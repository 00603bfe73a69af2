"""Guess-the-number: a multi-turn game with a reward on every turn.

The env picks a secret integer in ``[low, high]``; each turn the model guesses and
is told "too low", "too high" or "correct". The guess read from a message is the
last integer in ``<answer>...</answer>`` if present, else the last integer in the
message.

**Turn rewards** (for turn-level credit assignment): a hit earns ``1.0`` and ends
the episode; any other valid guess earns ``shaping * (width_before - width_after) /
initial_width``, where ``width`` is the size of the interval still consistent with
all feedback, so only informative guesses pay and the shaping over an episode sums
to at most ``shaping``. A message with no integer costs ``format_penalty``.
``max_turns`` guesses without a hit truncate the episode.

**Splits.** ``train``: the secret lies in ``[1, 100]``, 10 turns (binary search
needs at most 7). ``heldout``: ``[1, 1000]``, 12 turns (at most 10 needed) — a range
the train split never shows.
"""

from __future__ import annotations

import re

import gymnasium
import numpy as np

from taurl.envs.base import Task, TextEnv, Turn, answer_tag, user
from taurl.errors import ConfigError
from taurl.types import Message

_INT_RE = re.compile(r"-?\d+")
_SPLIT_DEFAULTS = {"train": (1, 100, 10), "heldout": (1, 1000, 12)}
_PROMPT = (
    "I am thinking of an integer between {low} and {high} (inclusive). Guess it in at most "
    "{turns} tries. After each guess I will tell you whether my number is higher or lower. "
    "Reply with your guess inside <answer></answer> tags."
)


def read_guess(text: str) -> int | None:
    """The guessed integer: the last one in ``<answer>`` if present, else the last one in ``text``."""
    tagged = answer_tag(text)
    found = _INT_RE.findall(tagged if tagged is not None else text)
    return int(found[-1]) if found else None


class GuessNumberEnv(TextEnv):
    """Find a secret integer from higher/lower feedback; rewarded on every turn.

    Args:
        split: ``"train"`` (1..100) or ``"heldout"`` (1..1000).
        low: Smallest possible secret (default from the split).
        high: Largest possible secret (default from the split).
        max_turns: Guesses allowed (default from the split).
        shaping: Total reward available for narrowing the interval before the hit (0 turns it off).
        format_penalty: Reward of a turn whose message holds no integer (given as a cost, >= 0).
        system_prompt: Optional system message before the task.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        low: int | None = None,
        high: int | None = None,
        max_turns: int | None = None,
        shaping: float = 0.5,
        format_penalty: float = 0.1,
        system_prompt: str | None = None,
    ) -> None:
        if split not in _SPLIT_DEFAULTS:
            raise ConfigError(f"GuessNumberEnv: split must be one of {tuple(_SPLIT_DEFAULTS)}, got {split!r}")
        d_low, d_high, d_turns = _SPLIT_DEFAULTS[split]
        super().__init__(split, max_turns=d_turns if max_turns is None else max_turns, system_prompt=system_prompt)
        self.low = d_low if low is None else low
        self.high = d_high if high is None else high
        for key, value in (("low", self.low), ("high", self.high)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"GuessNumberEnv: {key} must be an int, got {value!r}")
        if self.high - self.low < 2:
            raise ConfigError(
                f"GuessNumberEnv: need high - low >= 2 so that guessing is a game, got low={self.low}, high={self.high}"
            )
        for key, value in (("shaping", shaping), ("format_penalty", format_penalty)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise ConfigError(f"GuessNumberEnv: {key} must be a finite number >= 0, got {value!r}")
        self.shaping = float(shaping)
        self.format_penalty = float(format_penalty)
        self.secret = self.low
        self.lo = self.low  # the interval still consistent with the feedback so far
        self.hi = self.high

    def make_task(self, rng: np.random.Generator) -> Task:
        secret = int(rng.integers(self.low, self.high + 1))
        return Task(
            id=f"guess/{self.split}/{self.low}-{self.high}/{secret}",
            prompt=_PROMPT.format(low=self.low, high=self.high, turns=self.max_turns),
            answer=secret,
            privileged_context=f"The secret number is {secret}.",
        )

    def on_reset(self, task: Task) -> None:
        self.secret = int(task.answer)  # type: ignore[arg-type]
        self.lo, self.hi = self.low, self.high

    def turn(self, action: str) -> Turn:
        guess = read_guess(action)
        if guess is None:
            return Turn(
                [user("I could not find a number in your reply. Reply with one integer inside <answer></answer>.")],
                -self.format_penalty, False,
                {"success": False, "error": "no integer in the message"},
            )
        if guess == self.secret:
            return Turn([], 1.0, True, {"success": True, "guess": guess})
        width_before = self.hi - self.lo + 1
        if guess < self.secret:
            self.lo = max(self.lo, guess + 1)
            feedback = "higher"
        else:
            self.hi = min(self.hi, guess - 1)
            feedback = "lower"
        narrowed = width_before - (self.hi - self.lo + 1)
        reward = self.shaping * narrowed / (self.high - self.low + 1)
        left = self.max_turns - self.turn_index
        text = f"{guess} is wrong: my number is {feedback}. {left} {'guess' if left == 1 else 'guesses'} left."
        return Turn([user(text)], reward, False, {"success": False, "guess": guess})


def _interval(messages: list[Message]) -> tuple[int, int]:
    """The interval still consistent with the conversation, read from the prompt and the feedback."""
    lo, hi = (int(x) for x in re.findall(r"between (-?\d+) and (-?\d+)", messages[0]["content"])[0])
    for m in messages[1:]:
        found = re.match(r"(-?\d+) is wrong: my number is (higher|lower)", m["content"])
        if m["role"] == "user" and found:
            g = int(found.group(1))
            lo, hi = (max(lo, g + 1), hi) if found.group(2) == "higher" else (lo, min(hi, g - 1))
    return lo, hi


def oracle_policy(env: gymnasium.Env, messages: list[Message]) -> str:
    """Binary search from the conversation alone: guess the middle of the consistent interval."""
    lo, hi = _interval([m for m in messages if m["role"] != "system"])
    return f"<answer>{(lo + hi) // 2}</answer>"


def failing_policy(env: gymnasium.Env, messages: list[Message]) -> str:
    """Always guesses one below the range: never hits, so the episode is truncated."""
    return f"My guess is <answer>{env.unwrapped.low - 1}</answer>"
