"""GRPO and its two best-known revisions, Dr.GRPO and DAPO.

GRPO samples a group of answers per task and uses the group as its own baseline:
no critic. The reward side is ``group_norm`` (return minus group mean, over the
group std); the trajectory side is PPO's clipped surrogate against the learner's
own log-probs, with a k3 KL to the reference model added to the loss.

Dr.GRPO removes two biases: dividing by the group std (which up-weights groups that
are nearly solved or nearly hopeless) and dividing each sequence's loss by its own
length (which makes long wrong answers cheap). DAPO keeps the std but clips the
ratio higher than lower (more room to raise unlikely good tokens), averages over
all tokens of the batch, drops groups whose answers all score the same, and drops
the KL term. GRPO's options below are written out in full; the revisions list only
what they change.

Every preset also truncates importance weights against the sampler's log-probs at
2 (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
training"): vLLM and the learner never agree exactly.
"""

import dataclasses

from taurl.learners.options import AlgorithmOptions

SUMMARY = "Group Relative Policy Optimization: group-normalised returns + PPO clip + k3 KL"
PAPER = "Shao et al. 2024, DeepSeekMath (arXiv 2402.03300)"

OPTIONS = AlgorithmOptions(
    # reward side
    advantage="group_norm",  # A = (R - mean_group) / std_group, on every token of the answer
    credit="episode",  # one score per episode (outcome supervision)
    group_scale="std",  # divide by the unbiased group std
    gamma=1.0,  # unused without a critic
    lam=1.0,  # unused without a critic
    gamma_turn=1.0,  # used only with credit=turn
    step_group_weight=0.0,  # no GiGPO step groups
    filter_zero_var_groups=False,  # keep every group (their advantage is 0 anyway)
    kl_coef=0.04,  # β = 0.04 in DeepSeekMath
    kl_estimator="k3",  # the unbiased, non-negative estimator, in the loss
    kl_in="loss",
    teacher="none",
    teacher_path="",
    teacher_coef=0.0,
    teacher_clip=0.0,
    advantage_coef=1.0,
    # trajectory side
    policy_loss="ppo_clip",
    eps_low=0.2,  # ε = 0.2
    eps_high=0.2,
    dual_clip=0.0,
    tis_cap=2.0,  # sampler–learner mismatch correction (see module docstring)
    loss_agg="seq-mean-token-mean",  # 1/G Σ_i 1/|o_i| Σ_t, as written in the paper
    loss_norm_len=0,
    entropy_coef=0.0,
    critic="none",
    critic_path="",
    vf_coef=0.0,
    value_clip=0.0,
    epochs=1,  # μ = 1: one step per batch, so the ratio starts at 1
    minibatches=1,
)

DR_SUMMARY = "Dr.GRPO: GRPO without the std and length normalisations"
DR_PAPER = "Liu et al. 2025, Understanding R1-Zero-Like Training (arXiv 2503.20783)"

DR_OPTIONS = dataclasses.replace(
    OPTIONS,
    group_scale="none",  # A = R - mean_group: no division by the std
    kl_coef=0.0,  # the paper trains without a KL term
    loss_agg="seq-mean-token-sum-norm",  # Σ tokens / (G × a constant length); loss_norm_len 0:
    # the longest answer in the batch (the paper uses the generation budget)
)

DAPO_SUMMARY = "DAPO: clip-higher, token-mean loss, dynamic sampling, no KL"
DAPO_PAPER = "Yu et al. 2025, DAPO (arXiv 2503.14476)"

DAPO_OPTIONS = dataclasses.replace(
    OPTIONS,
    filter_zero_var_groups=True,  # dynamic sampling: drop groups with all-equal rewards
    kl_coef=0.0,  # no KL: long reasoning is meant to move far from the initial model
    eps_high=0.28,  # ε_high = 0.28 > ε_low = 0.2: clip-higher
    loss_agg="token-mean",  # token-level policy gradient loss
)
