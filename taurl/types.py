"""The records that flow between taurl's parts: env → agent → rollout → learner.

This module is a leaf: it imports nothing of taurl but ``taurl.errors``, so every
part can depend on it without cycles.

A :class:`Trajectory` is one episode, token-exact. Its per-token lists all have the
same length ``T`` (prompt + every turn)::

    token_ids   [T] int    the whole token stream, exactly as the policy saw it
    loss_mask   [T] 0/1    1 only on tokens the policy sampled (assistant turns)
    logprobs    [T] float  the sampler's log-prob of each sampled token, 0.0 elsewhere
    turn_ids    [T] int    -1 for the initial prompt; h for turn h's sampled tokens and
                           for the observation the environment returned after turn h

and its per-turn list ``rewards`` has one entry per assistant turn (``H`` turns), with
``episode_return == sum(rewards)``. The policy's own tokens are never re-tokenized.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias, get_args

from taurl.errors import ConfigError, SchemaError, TrajectoryError

#: Version of the Trajectory JSONL schema this taurl writes and reads.
SCHEMA_VERSION = 1

JSONValue: TypeAlias = "str | int | float | bool | None | list[JSONValue] | dict[str, JSONValue]"
Message: TypeAlias = dict[str, JSONValue]
"""A chat message: ``{"role": "user" | "assistant" | "system" | "tool", "content": str, ...}``."""

Termination = Literal["terminated", "truncated", "max_turns", "context_overflow", "error"]
TERMINATIONS: tuple[str, ...] = get_args(Termination)

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """How an inference backend samples one turn."""

    max_tokens: int = 256  # most new tokens in one assistant turn
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling mass
    top_k: int = -1  # -1 keeps every token
    stop: tuple[str, ...] = ()  # strings that end the turn (kept out of the output)
    seed: int | None = None  # per-request seed; None lets the backend choose

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError(
                f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Generation:
    """What a backend returns for one request: the sampled tokens and their log-probs."""

    token_ids: list[int]  # [N] sampled tokens, EOS included when the model emitted it
    logprobs: list[float]  # [N] sampler log-prob of each sampled token
    finish_reason: FinishReason  # "stop" (EOS / stop string), "length" (max_tokens), "abort"

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"Generation has {len(self.token_ids)} token ids but {len(self.logprobs)} "
                "logprobs; a backend must return one logprob per sampled token"
            )


@dataclass
class Trajectory:
    """One episode, token-exact, with everything a learner and a reader need.

    Invariants are checked on construction (see :meth:`validate`); a broken one
    raises :class:`~taurl.errors.TrajectoryError` naming the field.
    """

    token_ids: list[int]  # [T] prompt + all turns
    loss_mask: list[int]  # [T] 1 only on sampled tokens
    logprobs: list[float]  # [T] sampler log-probs on sampled tokens, 0.0 elsewhere
    turn_ids: list[int]  # [T] -1 for the prompt, h for turn h (its action and the reply to it)
    rewards: list[float]  # [H] reward of each assistant turn
    episode_return: float  # sum(rewards)
    termination: Termination  # why the episode ended
    env_id: str = ""  # Gymnasium id, e.g. "taurl/Calculator-v0"
    task_id: str = ""  # which task of the env's split
    seed: int | None = None  # the env reset seed
    group_id: str = ""  # episodes sharing a group_id answer the same task (GRPO groups)
    policy_version: int = 0  # the learner step whose weights sampled this episode
    success: bool | None = None  # the env's own verdict, when it gives one
    messages: list[Message] = field(default_factory=list)  # the conversation, for reading
    timing: dict[str, float] = field(default_factory=dict)  # seconds: generate, env, total
    info: dict[str, JSONValue] = field(default_factory=dict)  # env extras, error details, drift

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_turns(self) -> int:
        """Number of assistant turns ``H``."""
        return len(self.rewards)

    @property
    def num_sampled_tokens(self) -> int:
        """Number of tokens the policy sampled (``sum(loss_mask)``)."""
        return sum(self.loss_mask)

    def validate(self) -> None:
        """Check the invariants; raise TrajectoryError naming the first broken one."""
        n = len(self.token_ids)
        for name in ("loss_mask", "logprobs", "turn_ids"):
            got = len(getattr(self, name))
            if got != n:
                raise TrajectoryError(
                    f"Trajectory.{name} has length {got}, expected {n} (= len(token_ids)); "
                    "every per-token list covers the whole token stream"
                )
        if self.termination not in TERMINATIONS:
            raise TrajectoryError(
                f"Trajectory.termination must be one of {TERMINATIONS}, got {self.termination!r}"
            )
        num_turns = len(self.rewards)
        last_turn = -1
        for i, (tok, m, lp, t) in enumerate(
            zip(self.token_ids, self.loss_mask, self.logprobs, self.turn_ids, strict=True)
        ):
            if not isinstance(tok, int) or tok < 0:
                raise TrajectoryError(
                    f"Trajectory.token_ids[{i}] must be a non-negative int, got {tok!r}"
                )
            if m not in (0, 1):
                raise TrajectoryError(f"Trajectory.loss_mask[{i}] must be 0 or 1, got {m!r}")
            if m == 1:
                if not (math.isfinite(lp) and lp <= 1e-6):
                    raise TrajectoryError(
                        f"Trajectory.logprobs[{i}] = {lp!r} on a sampled token; expected a "
                        "finite log-probability <= 0 from the sampler"
                    )
                if not 0 <= t < num_turns:
                    raise TrajectoryError(
                        f"Trajectory.turn_ids[{i}] = {t} on a sampled token, expected a turn in "
                        f"[0, {num_turns}) (one reward per turn; the prompt is turn -1)"
                    )
            elif lp != 0.0:
                raise TrajectoryError(
                    f"Trajectory.logprobs[{i}] = {lp!r} on a token with loss_mask 0; only "
                    "sampled tokens carry a logprob (store 0.0 elsewhere)"
                )
            if t < last_turn:
                raise TrajectoryError(
                    f"Trajectory.turn_ids must not decrease: turn_ids[{i}] = {t} after {last_turn}"
                )
            last_turn = t
        if not all(math.isfinite(r) for r in self.rewards):
            raise TrajectoryError(f"Trajectory.rewards must be finite, got {self.rewards}")
        if not math.isclose(self.episode_return, sum(self.rewards), rel_tol=1e-6, abs_tol=1e-6):
            raise TrajectoryError(
                f"Trajectory.episode_return = {self.episode_return} but sum(rewards) = "
                f"{sum(self.rewards)}; the return of an episode is the sum of its turn rewards"
            )

    # -- serialisation -------------------------------------------------------------

    def to_dict(self) -> dict[str, JSONValue]:
        """A JSON-ready dict with ``schema_version`` first."""
        out: dict[str, JSONValue] = {"schema_version": SCHEMA_VERSION}
        out.update(dataclasses.asdict(self))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, JSONValue]) -> Trajectory:
        """Inverse of :meth:`to_dict`. Raises SchemaError on a wrong or newer schema."""
        if not isinstance(data, dict):
            raise SchemaError(f"expected a JSON object for a Trajectory, got {type(data).__name__}")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise SchemaError(
                f"field 'schema_version' missing or not an int (got {version!r}); "
                "this file was not written by taurl"
            )
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"field 'schema_version' is {version}, newer than the {SCHEMA_VERSION} this taurl "
                "reads; upgrade taurl to read this file"
            )
        if version < SCHEMA_VERSION:
            raise SchemaError(
                f"field 'schema_version' is {version}; this taurl reads only version "
                f"{SCHEMA_VERSION} and has no converter from {version}"
            )
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names) - {"schema_version"})
        if unknown:
            raise SchemaError(
                f"unknown field {unknown[0]!r} in a schema-{version} Trajectory; "
                f"known fields: {sorted(names)}"
            )
        required = [
            n for n, f in names.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        for name in required:
            if name not in data:
                raise SchemaError(f"field {name!r} is missing from a schema-{version} Trajectory")
        kwargs = {k: v for k, v in data.items() if k != "schema_version"}
        try:
            return cls(**kwargs)  # type: ignore[arg-type]
        except TrajectoryError as e:
            raise SchemaError(f"invalid Trajectory record: {e}") from e

    def to_json(self) -> str:
        """One JSONL line (no newline). Floats round-trip exactly (repr precision)."""
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, line: str) -> Trajectory:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise SchemaError(f"a Trajectory line is not valid JSON: {e}") from e
        return cls.from_dict(data)


def write_jsonl(trajectories: Iterable[Trajectory], path: str | Path, append: bool = False) -> int:
    """Write trajectories to ``path``, one JSON object per line. Returns how many were written."""
    n = 0
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for traj in trajectories:
            f.write(traj.to_json() + "\n")
            n += 1
    return n


def iter_jsonl(path: str | Path) -> Iterator[Trajectory]:
    """Read trajectories lazily; a bad line raises SchemaError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield Trajectory.from_json(line)
            except SchemaError as e:
                raise SchemaError(f"{path}:{lineno}: {e}") from e


def read_jsonl(path: str | Path) -> list[Trajectory]:
    """Read every trajectory of a JSONL file written by :func:`write_jsonl`."""
    return list(iter_jsonl(path))
