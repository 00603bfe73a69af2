"""taurl: agentic reinforcement learning for language models.

J(θ) = E_{τ∼p_θ}[R(τ)]: environments (``taurl.envs``) and the agent loop
(``taurl.agents``) produce trajectories τ; ``taurl.rollout`` runs and evaluates
them; ``taurl.learners`` turns them into updates, with the reward side (advantages)
and the trajectory side (policy losses) as separate, composable pieces.
"""

__version__ = "0.1.0"
