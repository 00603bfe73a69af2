"""The first error of each environment, in words: what the commands print to stderr.

An episode whose environment raised ends with ``termination == "error"`` and the run
goes on, since one bad task should not end a long rollout. But an environment that
fails on *every* task (a factory without ``split``, a ``reset`` without ``options``, an
observation of the wrong type) would then show up only as ``error:N`` in a table, with
the cause left in the JSONL. So ``taurl eval``, ``rollout`` and ``train`` print each
environment's first error with its traceback (:func:`env_failures`,
:meth:`EnvFailures.format`), the first two fail when every episode of an environment
errored, and training stops past ``TrainConfig.max_error_rate``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from taurl.types import JSONValue, Trajectory


@dataclass(frozen=True)
class EnvFailures:
    """The errored episodes of one environment: how many, and the first one's cause."""

    env_id: str  # the environment
    errors: int  # episodes that ended in "error"
    episodes: int  # episodes of this environment in the run
    first_error: str  # info["error"] of the first errored episode, in (task, sample) order
    traceback: str  # its info["traceback"]: last frames and message ("" when none, e.g. a backend abort)

    @property
    def all_failed(self) -> bool:
        """Every episode errored: the environment (or its wiring) is broken, not the policy."""
        return self.errors == self.episodes

    def format(self, label: str = "") -> str:
        """A few lines for stderr: the count, the first error and its indented traceback."""
        who = f"{self.env_id} ({label})" if label else self.env_id
        text = (
            f"taurl: {who}: {self.errors}/{self.episodes} episodes ended in error; "
            f"the first: {self.first_error}"
        )
        if self.traceback:
            text += "\n" + textwrap.indent(self.traceback, "    ")
        return text

    def to_dict(self) -> dict[str, JSONValue]:
        return {
            "env_id": self.env_id, "errors": self.errors, "episodes": self.episodes,
            "first_error": self.first_error, "traceback": self.traceback,
        }


def env_failures(trajectories: Sequence[Trajectory]) -> list[EnvFailures]:
    """One :class:`EnvFailures` per environment with an errored episode, in order of appearance."""
    episodes: dict[str, int] = {}
    errored: dict[str, list[Trajectory]] = {}
    for traj in trajectories:
        episodes[traj.env_id] = episodes.get(traj.env_id, 0) + 1
        if traj.termination == "error":
            errored.setdefault(traj.env_id, []).append(traj)
    return [
        EnvFailures(
            env_id=env_id,
            errors=len(trajs),
            episodes=episodes[env_id],
            first_error=str(trajs[0].info.get("error", "(no message recorded)")),
            traceback=str(trajs[0].info.get("traceback", "")),
        )
        for env_id, trajs in errored.items()
    ]
