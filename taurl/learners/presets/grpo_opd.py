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

from taurl.learners.options import AlgorithmOptions

SUMMARY = "GRPO + on-policy distillation from a (privileged-context) teacher"
PAPER = (
    "Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD, arXiv 2306.13649); "
    "Shao et al. 2024, DeepSeekMath (arXiv 2402.03300)"
)

OPTIONS = AlgorithmOptions(
    # reward side
    advantage="group_norm",  # A_GRPO
    credit="episode",
    group_scale="std",
    gamma=1.0,
    lam=1.0,
    gamma_turn=1.0,
    step_group_weight=0.0,
    filter_zero_var_groups=False,  # zero-variance groups still carry the teacher's signal
    kl_coef=0.0,  # the teacher already anchors the policy
    kl_estimator="k3",
    kl_in="loss",
    teacher="privileged",  # frozen base model + info["privileged_context"]
    teacher_path="",
    teacher_coef=1.0,  # λ = 1: the reverse-KL reward at unit weight, as in GKD
    teacher_clip=0.0,  # no clamp on teacher - student
    advantage_coef=1.0,  # α = 1; set 0 for pure OPD
    # trajectory side
    policy_loss="ppo_clip",
    eps_low=0.2,
    eps_high=0.2,
    dual_clip=0.0,
    tis_cap=2.0,
    loss_agg="token-mean",  # the teacher's signal is per token
    loss_norm_len=0,
    entropy_coef=0.0,
    critic="none",
    critic_path="",
    vf_coef=0.0,
    value_clip=0.0,
    epochs=1,
    minibatches=1,
)
