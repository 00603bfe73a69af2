"""PPO with a learned critic and GAE, at the token level or at the turn level.

The reward side uses a value function V(s) to assign credit: GAE turns the rewards
and the critic's values into per-step advantages. The trajectory side is the
clipped surrogate, run for several epochs of minibatches over each batch, with the
critic's clipped value loss added. The KL to the reference model is a per-token
penalty in the reward, as in InstructGPT.

``ppo`` treats every sampled token as a step (the turn's reward lands on its last
token). ``ppo_turn`` treats every assistant turn as a step: the critic is read once
per turn, at the turn's first token, ``δ_h = r_h + γ V(s_{h+1}) - V(s_h)``, and the
turn's advantage is given to all its tokens — suited to multi-turn agents, where
rewards arrive per turn and within-turn token credit is noise.
"""

import dataclasses

from taurl.learners.presets import grpo

SUMMARY = "PPO: value head on the policy, token-level GAE, clipped surrogate, KL in reward"
TURN_SUMMARY = "PPO with turn-level GAE: the critic evaluated once per turn"
PAPER = (
    "Schulman et al. 2017, PPO (arXiv 1707.06347); Ouyang et al. 2022, InstructGPT "
    "(arXiv 2203.02155); Huang et al. 2024, The N+ implementation details of RLHF with PPO"
)

OPTIONS = dataclasses.replace(
    grpo.OPTIONS,  # the options GRPO spells out, changed where PPO differs:
    advantage="gae",  # token-level GAE, γ = 1 (short episodes, reward at the end)
    lam=0.95,  # λ = 0.95
    kl_coef=0.05,  # per-token KL penalty β in the reward (InstructGPT-style)
    kl_estimator="k1",
    kl_in="reward",
    loss_agg="token-mean",
    critic="head",  # a linear value head on the policy's last hidden state
    vf_coef=0.1,  # value loss weight
    value_clip=0.2,  # value clipping range
    epochs=4,  # 4 PPO epochs per batch
    minibatches=4,  # 4 optimizer steps per epoch
)

TURN_OPTIONS = dataclasses.replace(OPTIONS, advantage="turn_gae")
