"""GRPO-OPD: GRPO's outcome advantage plus a teacher's per-token signal.

On-policy distillation scores the student's own samples with a teacher and uses,
for every sampled token, ``λ (log π_teacher(token) - log π_student(token))`` as an
extra, dense advantage: the student moves towards tokens the teacher finds likelier
than it does, on the states the student itself reaches. Added to GRPO's sparse
outcome advantage, ``A = α A_GRPO + λ opd``; α = 0 is pure on-policy distillation.

The default teacher is the policy's own frozen base model given privileged context
that the environment provides in ``Trajectory.info["privileged_context"]`` (e.g. the
reference solution), inserted before the conversation as an extra system message:
it scores the student's exact tokens knowing the answer. Set ``options.teacher=model``
with ``options.teacher_path`` for a separate (larger) teacher, or ``precomputed`` to
read ``info["teacher_logprobs"]`` filled in by an inference engine.
"""

import dataclasses

from taurl.learners.presets import grpo

SUMMARY = "GRPO + on-policy distillation from a (privileged-context) teacher"
PAPER = (
    "Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD, arXiv 2306.13649); "
    "Shao et al. 2024, DeepSeekMath (arXiv 2402.03300)"
)

OPTIONS = dataclasses.replace(
    grpo.OPTIONS,  # A_GRPO: group-normalised outcome advantage, PPO clip
    kl_coef=0.0,  # the teacher already anchors the policy
    teacher="privileged",  # frozen base model + info["privileged_context"]
    teacher_coef=1.0,  # λ = 1: the reverse-KL reward at unit weight, as in GKD
    loss_agg="token-mean",  # the teacher's signal is per token
    # filter_zero_var_groups stays off: zero-variance groups still carry the teacher's signal;
    # teacher_clip 0: no clamp on teacher - student; advantage_coef α = 1 (0 = pure OPD)
)
