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

from taurl.learners.options import AlgorithmOptions

SUMMARY = "REINFORCE with a leave-one-out (RLOO) or batch-whitened baseline, TIS-corrected"
PAPER = "Ahmadian et al. 2024, Back to Basics: REINFORCE-style optimization (arXiv 2402.14740)"

OPTIONS = AlgorithmOptions(
    # reward side
    advantage="rloo",  # A_i = R_i - mean of the other samples of the task
    credit="episode",
    group_scale="std",  # unused by rloo
    gamma=1.0,
    lam=1.0,
    gamma_turn=1.0,
    step_group_weight=0.0,
    filter_zero_var_groups=False,
    kl_coef=0.05,  # β = 0.05 in the paper's experiments
    kl_estimator="k1",  # log π_θ - log π_ref, subtracted from the reward
    kl_in="reward",
    teacher="none",
    teacher_path="",
    teacher_coef=0.0,
    teacher_clip=0.0,
    advantage_coef=1.0,
    # trajectory side
    policy_loss="reinforce",  # -A log π_θ(token)
    eps_low=0.2,  # unused by reinforce
    eps_high=0.2,  # unused by reinforce
    dual_clip=0.0,
    tis_cap=2.0,  # truncated importance sampling against the sampler
    loss_agg="token-mean",
    loss_norm_len=0,
    entropy_coef=0.0,
    critic="none",
    critic_path="",
    vf_coef=0.0,
    value_clip=0.0,
    epochs=1,  # REINFORCE is on-policy: one step per batch
    minibatches=1,
)
