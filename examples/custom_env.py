"""A new tool-use environment in ~30 lines: tasks, a typed tool, a reward.

Run it: ``python examples/custom_env.py`` (checks the env and plays one scripted episode).
"""

import gymnasium

from taurl.envs import Task, ToolEnv, check_env, register_env

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo"}


def capital_of(country: str) -> str:
    """Look up the capital city of a country.

    Args:
        country: The country's English name, e.g. "France".
    """
    return CAPITALS[country]  # a KeyError becomes an error message the model reads


class CapitalsEnv(ToolEnv):
    """Name a country's capital; the capital_of tool knows them all."""

    tasks = {
        "train": [Task(c, f"What is the capital of {c}?", answer=a) for c, a in list(CAPITALS.items())[:3]],
        "heldout": [Task(c, f"Which city is the seat of government of {c}?", answer=a)
                    for c, a in list(CAPITALS.items())[3:]],
    }

    def __init__(self, split: str = "train", **kwargs: object) -> None:
        super().__init__([capital_of], split, **kwargs)

    def score(self, task: Task, answer: str) -> bool:
        return answer.strip().casefold() == str(task.answer).casefold()


register_env("examples/Capitals-v0", CapitalsEnv)

if __name__ == "__main__":
    env = gymnasium.make("examples/Capitals-v0", split="heldout")
    check_env(env)
    obs, info = env.reset(seed=0)
    country = obs[-1]["content"].split(" of ")[-1].rstrip("?")
    call = f'<tool_call>{{"name": "capital_of", "arguments": {{"country": "{country}"}}}}</tool_call>'
    obs, reward, *_ = env.step(call)
    print(obs[0]["content"])
    answer = obs[0]["content"].splitlines()[1]
    print(env.step(f"<answer>{answer}</answer>"))
