"""The knobs of an algorithm, and how a preset's defaults and a user's choices combine.

An algorithm is a named preset (``taurl/learners/presets/``) that fills every field of
:class:`AlgorithmOptions`. A user's config sets only the fields it wants to change;
``None`` means "the preset's value"; 0 turns a term off, here and in the math functions
(``advantages``, ``losses``), which take the resolved values as they are.
:func:`resolve` merges the two and checks that the combination makes sense.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from taurl.errors import ConfigError
from taurl.learners.advantages import CRITIC_ESTIMATORS, ESTIMATORS
from taurl.learners.losses import AGGREGATIONS, POLICY_LOSSES

Teacher = Literal["none", "model", "privileged", "precomputed"]
Critic = Literal["none", "head", "model"]


@dataclass
class AlgorithmOptions:
    """One algorithm's choices on both sides of J(θ). ``None``: take the preset's value."""

    # -- reward side: what R(τ) credits to which token --
    advantage: str | None = None  # estimator: group_norm | rloo | batch_norm | gae | turn_gae
    credit: Literal["episode", "turn"] | None = None  # score whole episodes, or each turn by G_h
    group_scale: Literal["std", "none"] | None = None  # divide by group std (GRPO) or not (Dr.GRPO)
    gamma: float | None = None  # token-level discount for gae
    lam: float | None = None  # GAE λ (gae and turn_gae)
    gamma_turn: float | None = None  # discount per turn: turn credit, turn_gae
    step_group_weight: float | None = None  # GiGPO ω: weight of step-group advantages; 0 = off
    filter_zero_var_groups: bool | None = None  # drop groups whose returns are all equal (DAPO)
    kl_coef: float | None = None  # weight of KL(π_θ || π_ref); 0 = no reference model
    kl_estimator: Literal["k1", "k2", "k3"] | None = None  # per-token KL estimator
    kl_in: Literal["reward", "loss"] | None = None  # KL taken from the reward, or added to the loss
    teacher: Teacher | None = None  # none | model | privileged | precomputed (see teacher.py)
    teacher_path: str | None = None  # folder of the teacher model when teacher = model
    teacher_coef: float | None = None  # λ: weight of the per-token teacher advantage; 0 = the
    # teacher is scored and reward/teacher_gap logged, but not trained on (a control arm)
    teacher_clip: float | None = None  # clamp teacher - student log-prob gaps to ±this; 0 = none
    advantage_coef: float | None = None  # α: weight of the estimator's advantage; 0 = pure OPD
    # -- trajectory side: how log p_θ(τ) enters the gradient --
    policy_loss: str | None = None  # policy loss: ppo_clip | reinforce
    eps_low: float | None = None  # ratio clipped below at 1 - eps_low
    eps_high: float | None = None  # ratio clipped above at 1 + eps_high (> eps_low: clip-higher)
    dual_clip: float | None = None  # dual-clip constant c > 1 for negative advantages; 0 = off
    tis_cap: float | None = None  # cap of importance weights vs the sampler's log-probs; 0 = off
    loss_agg: str | None = None  # aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    loss_norm_len: int | None = None  # length of seq-mean-token-sum-norm; 0 = longest in batch
    entropy_coef: float | None = None  # entropy bonus weight; 0 = off (entropy still reported)
    critic: Critic | None = None  # none | head (value head on the policy) | model (separate)
    critic_path: str | None = None  # critic model folder when critic = model; "" = the policy's
    vf_coef: float | None = None  # weight of the value loss
    value_clip: float | None = None  # value clip range; 0 = unclipped
    epochs: int | None = None  # passes over each batch of trajectories
    minibatches: int | None = None  # optimizer steps per epoch (the batch is split evenly)

    def __post_init__(self) -> None:
        _check_choice("advantage", self.advantage, ESTIMATORS)
        _check_choice("policy_loss", self.policy_loss, POLICY_LOSSES)
        _check_choice("loss_agg", self.loss_agg, AGGREGATIONS)
        for name in ("gamma", "lam", "gamma_turn"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ConfigError(f"options.{name} must be in [0, 1], got {v}; 1.0 = no discount")
        for name in ("step_group_weight", "kl_coef", "teacher_coef", "teacher_clip",
                     "eps_low", "eps_high", "tis_cap", "entropy_coef", "vf_coef", "value_clip"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"options.{name} must be >= 0, got {v}; use 0 to turn it off")
        if self.eps_low is not None and self.eps_low >= 1:
            raise ConfigError(
                f"options.eps_low must be < 1 (the ratio floor is 1 - eps_low), got {self.eps_low}"
            )
        if self.dual_clip is not None and self.dual_clip != 0 and self.dual_clip <= 1:
            raise ConfigError(
                f"options.dual_clip must be > 1 (typically 3) or 0 to turn it off, got "
                f"{self.dual_clip}"
            )
        for name in ("epochs", "minibatches"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"options.{name} must be >= 1, got {v}")
        if self.loss_norm_len is not None and self.loss_norm_len < 0:
            raise ConfigError(
                f"options.loss_norm_len must be >= 0 (0 = longest sequence), got "
                f"{self.loss_norm_len}"
            )


def _check_choice(name: str, value: str | None, valid: object) -> None:
    if value is not None and value not in valid:  # type: ignore[operator]
        raise ConfigError(
            f"options.{name} = {value!r} is not one of: {', '.join(valid)}"  # type: ignore[arg-type]
        )


def resolve(preset: AlgorithmOptions, user: AlgorithmOptions, preset_name: str) -> AlgorithmOptions:
    """The preset's options with every non-None field of ``user`` laid over them.

    Raises ConfigError when a field is still unset or the combination cannot work.
    """
    chosen = {f.name: getattr(user, f.name) for f in dataclasses.fields(user)}
    out = dataclasses.replace(preset, **{k: v for k, v in chosen.items() if v is not None})
    missing = [f.name for f in dataclasses.fields(out) if getattr(out, f.name) is None]
    if missing:
        raise ConfigError(
            f"preset {preset_name!r} leaves {missing} unset; every preset must fill every option"
        )
    _check_combination(out, preset_name)
    return out


def _check_combination(o: AlgorithmOptions, preset_name: str) -> None:
    where = f"algorithm {preset_name!r}"
    if o.advantage in CRITIC_ESTIMATORS and o.critic == "none":
        raise ConfigError(
            f"{where}: advantage {o.advantage!r} needs a critic, but critic is 'none'; set "
            "options.critic=head (value head on the policy) or options.critic=model"
        )
    if o.advantage in CRITIC_ESTIMATORS and o.credit == "turn":
        raise ConfigError(
            f"{where}: credit 'turn' applies to group_norm/rloo/batch_norm; for turn-level "
            "critic credit use options.advantage=turn_gae"
        )
    if o.teacher == "model" and not o.teacher_path:
        raise ConfigError(
            f"{where}: teacher 'model' needs options.teacher_path (a local model folder that "
            "shares the policy's tokenizer)"
        )
    if o.teacher == "none" and o.advantage_coef != 1:
        raise ConfigError(
            f"{where}: advantage_coef (α) = {o.advantage_coef} only scales GRPO-OPD's mix; "
            "without a teacher keep it at 1 and change the learning rate instead"
        )
    if o.step_group_weight and o.advantage in CRITIC_ESTIMATORS:
        raise ConfigError(
            f"{where}: step groups (GiGPO) add to a critic-free episode advantage; set "
            "options.step_group_weight=0 with a critic"
        )
