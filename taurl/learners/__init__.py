"""taurl.learners: turn Trajectories into policy updates.

The code follows the split of J(θ) = E_{τ∼p_θ}[R(τ)] into its two sides:

- reward side, :mod:`taurl.learners.advantages`: what R(τ) credits to which token
  (baselines, normalisation, turn-level credit, a teacher's signal);
- trajectory side, :mod:`taurl.learners.losses`: how log p_θ(τ) enters the gradient
  (ratios, clipping, importance weights, KL, entropy, aggregation).

An algorithm is a named preset (:mod:`taurl.learners.presets`) combining one of
each; :class:`Learner` runs its updates. Learners know nothing of environments or
inference engines: they see only ``taurl.types``, ``taurl.errors`` and tensors.
"""

from taurl.learners.config import LearnerConfig, LoraConfig
from taurl.learners.learner import Learner
from taurl.learners.options import AlgorithmOptions
from taurl.learners.presets import PRESETS, Preset, get_preset

__all__ = [
    "PRESETS",
    "AlgorithmOptions",
    "Learner",
    "LearnerConfig",
    "LoraConfig",
    "Preset",
    "get_preset",
]
