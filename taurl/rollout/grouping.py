"""Groups of trajectories that answer the same task (GRPO's groups)."""

from __future__ import annotations

from collections.abc import Iterable

from taurl.types import Trajectory


def group_trajectories(trajectories: Iterable[Trajectory]) -> list[list[Trajectory]]:
    """Trajectories grouped by ``group_id``, groups in first-seen order, members in input order."""
    groups: dict[str, list[Trajectory]] = {}
    for traj in trajectories:
        groups.setdefault(traj.group_id, []).append(traj)
    return list(groups.values())
