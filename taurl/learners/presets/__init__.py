"""Algorithm presets: each is one advantage estimator + one policy loss + options.

One file per algorithm, each readable top to bottom with its defaults and the paper
they come from. Select a preset by name from :data:`PRESETS`; override any option in
``LearnerConfig.options`` (``None`` keeps the preset's value).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from taurl.errors import ConfigError
from taurl.learners.options import AlgorithmOptions
from taurl.learners.presets import grpo, grpo_opd, ppo, reinforce


@dataclass(frozen=True)
class Preset:
    """A named algorithm: a full set of options and where they come from."""

    name: str  # the name configs select it by
    summary: str  # one line: what the algorithm is
    paper: str  # the paper its defaults come from
    options: AlgorithmOptions  # every field set


#: Every preset by name.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("reinforce", reinforce.SUMMARY, reinforce.PAPER, reinforce.OPTIONS),
        Preset("ppo", ppo.SUMMARY, ppo.PAPER, ppo.OPTIONS),
        Preset("ppo_turn", ppo.TURN_SUMMARY, ppo.PAPER, ppo.TURN_OPTIONS),
        Preset("grpo", grpo.SUMMARY, grpo.PAPER, grpo.OPTIONS),
        Preset("dr_grpo", grpo.DR_SUMMARY, grpo.DR_PAPER, grpo.DR_OPTIONS),
        Preset("dapo", grpo.DAPO_SUMMARY, grpo.DAPO_PAPER, grpo.DAPO_OPTIONS),
        Preset("grpo_opd", grpo_opd.SUMMARY, grpo_opd.PAPER, grpo_opd.OPTIONS),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name lists the valid ones."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown algorithm {name!r}; {hint}valid: {', '.join(PRESETS)}")
    return PRESETS[name]
