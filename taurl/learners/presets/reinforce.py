"""REINFORCE with a baseline: the plain score-function gradient, no ratio, no clip.

The gradient of J(θ) is E[A ∇log p_θ(τ)]; all the work is in the baseline that
makes A low-variance. The default is RLOO's leave-one-out baseline over the samples
of the same task, with a k1 KL to the reference model subtracted from the reward.
For REINFORCE++ (Hu 2025, arXiv 2501.03262) set ``options.advantage=batch_norm``:
returns whitened over the whole batch instead of per group.

Tokens were sampled by vLLM, whose log-probs never match the learner's exactly, so
the gradient is reweighted by truncated importance weights ``min(π_learner/π_sampler, 2)``
(Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
training").
"""

import dataclasses

from taurl.learners.presets import grpo

SUMMARY = "REINFORCE with a leave-one-out (RLOO) or batch-whitened baseline, TIS-corrected"
PAPER = "Ahmadian et al. 2024, Back to Basics: REINFORCE-style optimization (arXiv 2402.14740)"

OPTIONS = dataclasses.replace(
    grpo.OPTIONS,  # the options GRPO spells out, changed where REINFORCE differs:
    advantage="rloo",  # A_i = R_i - mean of the other samples of the task
    kl_coef=0.05,  # β = 0.05 in the paper's experiments
    kl_estimator="k1",  # log π_θ - log π_ref, subtracted from the reward
    kl_in="reward",
    policy_loss="reinforce",  # -A log π_θ(token); eps_low/eps_high unused
    loss_agg="token-mean",
    # tis_cap 2: truncated importance sampling against the sampler; epochs 1: on-policy
)
