"""Ready-made adapters for environments from SkyRL-Gym, GEM, TextArena and reasoning-gym.

Each constructor imports its package only when called (install it with the extra:
``pip install 'taurl[gem]'``, ``[skyrl]``, ``[textarena]``, ``[reasoning-gym]`` or
``[ecosystem]`` for all four) and returns an :class:`~taurl.envs.adapter.EnvAdapter`::

    from taurl.envs.thirdparty import gem_env
    env = gem_env("game:GuessTheNumber-v0-easy")

Importing :mod:`taurl.envs` registers a few of them with Gymnasium (``taurl eval --env
gem/game.GuessTheNumber-v0-easy``); :func:`register_thirdparty` registers all of a
package's envs. Gymnasium reads ``module:EnvId`` as "import module", so GEM's
``category:Name`` ids are registered as ``gem/category.Name``.

What each package gives and what the adapter does about it:

- **SkyRL-Gym** envs are built per task from a dataset row and started with ``init(prompt)``;
  ``step`` returns a dict with one ``done``. The adapter draws the row from the seed.
- **GEM** envs are Gymnasium-like but seed Python's global ``random`` in ``reset``: they
  run under the global-random lock. Partial credit on a lost game is not success.
- **TextArena** games have ``reset(num_players, seed)``, ``step -> (done, info)``, rewards
  from ``close()``, observations as ``(sender, text, kind)`` lists, and also seed the global
  ``random``. Two-player games need an ``opponent``: the learner plays one seat.
- **reasoning-gym** is a set of procedural datasets: one question, one scored answer.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from taurl.envs.adapter import EnvAdapter, StepResult, global_random_lock
from taurl.envs.base import SPLITS, answer_tag
from taurl.errors import ConfigError
from taurl.types import JSONValue, Message

Opponent = Callable[[str], str]
"""A player for the other seats: ``(everything that seat has seen, as text) -> its action``."""

PACKAGES: dict[str, tuple[str, str]] = {
    "skyrl": ("skyrl_gym", "skyrl"),
    "gem": ("gem", "gem"),
    "textarena": ("textarena", "textarena"),
    "reasoning-gym": ("reasoning_gym", "reasoning-gym"),
}
"""prefix -> (module, pip extra)."""


def _import(prefix: str) -> object:
    module, extra = PACKAGES[prefix]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"the {prefix} adapter needs the {module!r} package, which is not installed ({e}); "
            f"pip install 'taurl[{extra}]'"
        ) from e


def _check_split(split: str, where: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"{where}: split must be one of {SPLITS}, got {split!r}")


# -- SkyRL-Gym ---------------------------------------------------------------------------


def sample_gsm8k_rows(n: int = 64, seed: int = 0) -> list[dict[str, JSONValue]]:
    """``n`` generated arithmetic questions as SkyRL GSM8K dataset rows (no download needed)."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, JSONValue]] = []
    for _ in range(n):
        a, b, c = (int(x) for x in rng.integers(2, 60, size=3))
        question = (
            f"A shop has {a} boxes with {b} apples each and sells {c} apples. How many apples are left? "
            "Let's think step by step and output the final answer after \"####\"."
        )
        rows.append({
            "prompt": [{"role": "user", "content": question}],
            "env_class": "gsm8k",
            "reward_spec": {"method": "rule", "ground_truth": str(a * b - c)},
            "extra_info": {},
        })
    return rows


class SkyRLTasks:
    """SkyRL's per-task envs as one resettable env: ``reset(seed)`` draws a dataset row and builds its env."""

    def __init__(self, env_class: str, rows: Sequence[Mapping[str, JSONValue]], env_config: object = None) -> None:
        self.make = _import("skyrl").make  # type: ignore[attr-defined]
        if not rows:
            raise ConfigError(f"skyrl_env({env_class!r}): the dataset is empty; pass rows with 'prompt' and 'reward_spec'")
        self.env_class = env_class
        self.rows = list(rows)
        self.env_config = env_config if env_config is not None else {}
        self.rng = np.random.default_rng()
        self.env: object | None = None

    def reset(self, seed: int | None = None) -> tuple[object, dict[str, JSONValue]]:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        row = self.rows[int(self.rng.integers(len(self.rows)))]
        self.env = self.make(self.env_class, env_config=self.env_config, extras=dict(row))
        obs, info = self.env.init(list(row["prompt"]))  # type: ignore[attr-defined, arg-type]
        return obs, {**(info or {}), "extra_info": row.get("extra_info")}

    def step(self, action: str) -> object:
        return self.env.step(action)  # type: ignore[union-attr]

    def cut_off(self, result: StepResult) -> bool:
        """SkyRL's one ``done`` as truncation: a multi-turn env's last turn without the right answer."""
        max_turns = int(getattr(self.env, "max_turns", 1) or 1)
        return max_turns > 1 and result.turn >= max_turns and result.reward < 1.0

    def close(self) -> None:
        if self.env is not None:
            self.env.close()  # type: ignore[attr-defined]


def _read_rows(dataset: str | Path) -> list[dict[str, JSONValue]]:
    import json

    path = Path(dataset)
    if path.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")  # type: ignore[no-any-return]
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def skyrl_env(
    env_class: str = "gsm8k",
    *,
    dataset: str | Path | Sequence[Mapping[str, JSONValue]] | None = None,
    env_config: object = None,
    split: str = "train",
    max_turns: int | None = 8,
    **adapter_kwargs: object,
) -> EnvAdapter:
    """A SkyRL-Gym env (``skyrl_gym.make(env_class)``) over a dataset of task rows.

    Args:
        env_class: A SkyRL-Gym id: ``gsm8k``, ``gsm8k_multi_turn``, ``text2sql``, ...
        dataset: Rows (``prompt`` messages, ``reward_spec``, ``extra_info``) or a JSONL/parquet
            file of them; None: :func:`sample_gsm8k_rows` (a different sample per split).
        env_config: SkyRL's ``env_config`` for the env class.
        split: ``"train"`` or ``"heldout"``.
        max_turns: Truncate after this many turns (SkyRL envs end themselves too).
        adapter_kwargs: Passed to :class:`EnvAdapter` (``success=``, ``task_id=``, ...).
    """
    _check_split(split, "skyrl_env")
    if dataset is None:
        rows: Sequence[Mapping[str, JSONValue]] = sample_gsm8k_rows(seed=SPLITS.index(split))
    elif isinstance(dataset, (str, Path)):
        rows = _read_rows(dataset)
    else:
        rows = dataset
    tasks = SkyRLTasks(env_class, rows, env_config)
    adapter_kwargs.setdefault("truncated_if", tasks.cut_off)
    return EnvAdapter(
        tasks, name=f"skyrl/{env_class}", split=split, max_turns=max_turns, **adapter_kwargs,  # type: ignore[arg-type]
    )


# -- GEM ---------------------------------------------------------------------------------


def gem_env(env_id: str, *, split: str = "train", **adapter_kwargs: object) -> EnvAdapter:
    """A GEM env (``gem.make(env_id)``, e.g. ``"game:GuessTheNumber-v0-easy"``).

    GEM seeds Python's and NumPy's global random state in ``reset``, so the env runs under
    :func:`~taurl.envs.adapter.global_random_lock` (its constructor too: it draws from the
    global state). Success: a terminated, not truncated step that earns GEM's success reward.
    """
    _check_split(split, "gem_env")
    gem = _import("gem")
    env_id = env_id.replace(".", ":", 1) if ":" not in env_id else env_id
    with global_random_lock():
        env = gem.make(env_id)  # type: ignore[attr-defined]
    from gem.utils.constants import LanguageGameReward

    def success(r: StepResult) -> bool:
        return r.terminated and not r.truncated and r.reward >= LanguageGameReward.success_reward

    adapter_kwargs.setdefault("success", success)
    adapter_kwargs.setdefault("global_random", True)
    return EnvAdapter(env, name=f"gem/{env_id.replace(':', '.', 1)}", split=split, **adapter_kwargs)  # type: ignore[arg-type]


# -- TextArena ---------------------------------------------------------------------------


def render_textarena(observation: Sequence[object]) -> str:
    """TextArena's ``(sender_id, text, kind)`` messages as lines: ``[GAME] ...`` / ``[Player 1] ...``."""
    lines = []
    for item in observation:
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            sender, text = item[0], item[1]
            lines.append(f"[{'GAME' if sender == -1 else f'Player {sender}'}] {str(text).strip()}")
        else:
            lines.append(str(item).strip())
    return "\n".join(lines)


_MOVE_RE = re.compile(r"\[[^\[\]\n]{1,20}\]")


def first_available_move(seen: str) -> str:
    """A fixed TextArena opponent: the first move of the last ``Available Moves:`` line (else ``[0]``)."""
    for line in reversed(seen.splitlines()):
        if "Available Moves" in line:
            moves = _MOVE_RE.findall(line)
            if moves:
                return moves[0]
    return "[0]"


OPPONENTS: dict[str, Opponent] = {"first_available_move": first_available_move}
"""Opponents that a config can name (``env_kwargs: {opponent: first_available_move}``)."""


class TextArenaGame:
    """A TextArena game as a ``reset(seed)``/``step`` env in which the learner plays one seat.

    The other seats are played by ``opponent``, which sees everything its seat has been
    shown so far. The learner gets the messages new since its last turn; its reward is
    its entry in TextArena's final rewards.
    """

    def __init__(self, game: object, *, num_players: int, player_id: int, opponent: Opponent) -> None:
        self.game = game
        self.num_players = num_players
        self.player_id = player_id
        self.opponent = opponent
        self.seen: dict[int, list[str]] = {}
        self.outcome: dict[str, JSONValue] = {}

    def _pending(self, pid: int) -> str:
        # get_observation() returns and clears the current player's new messages.
        state = self.game.state  # type: ignore[attr-defined]
        new = list(state.observations.get(pid, []))
        state.observations[pid] = []
        text = render_textarena(new)
        if text:
            self.seen.setdefault(pid, []).append(text)
        return text

    def _play_others(self) -> bool:
        """Let the other seats move until it is the learner's turn; True when the game ended."""
        state = self.game.state  # type: ignore[attr-defined]
        while not state.done and state.current_player_id != self.player_id:
            pid = state.current_player_id
            self._pending(pid)
            done, _ = self.game.step(self.opponent("\n".join(self.seen.get(pid, []))))  # type: ignore[attr-defined]
            if done:
                return True
        return bool(state.done)

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, JSONValue]]:
        self.game.reset(num_players=self.num_players, seed=seed)  # type: ignore[attr-defined]
        self.seen = {}
        self.outcome = {}
        self._play_others()
        return self._pending(self.player_id), {"player_id": self.player_id}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, JSONValue]]:
        done, step_info = self.game.step(action)  # type: ignore[attr-defined]
        if not done:
            done = self._play_others()
        obs = self._pending(self.player_id)
        if not done:
            return obs, 0.0, False, False, dict(step_info or {})
        rewards, game_info = self.game.close()  # type: ignore[attr-defined]
        reward = float((rewards or {}).get(self.player_id, 0.0))
        mine = dict((game_info or {}).get(self.player_id, {}))
        state = self.game.state  # type: ignore[attr-defined]
        max_turns = getattr(state, "max_turns", None)
        truncated = max_turns is not None and state.turn >= max_turns and reward < 1.0
        return obs, reward, not truncated, truncated, {**dict(step_info or {}), "game_info": mine, "rewards": rewards}


def textarena_env(
    env_id: str,
    *,
    num_players: int | None = None,
    player_id: int = 0,
    opponent: Opponent | str | None = None,
    split: str = "train",
    **adapter_kwargs: object,
) -> EnvAdapter:
    """A TextArena game (``textarena.make(env_id + "-raw")``, e.g. ``"FifteenPuzzle-v0"``).

    Args:
        env_id: A TextArena id, without a wrapper suffix.
        num_players: Players in the game; default 2 with an ``opponent``, else 1.
        player_id: The learner's seat.
        opponent: Plays every other seat: ``(seen_text) -> action``; e.g.
            :func:`first_available_move`, or a function that asks another model; a name
            in :data:`OPPONENTS` also works.
        split: Reported in ``info["split"]``.
        adapter_kwargs: Passed to :class:`EnvAdapter`. Success default: a final reward >= 1
            (a won game or a solved puzzle; TextArena's partial credit is not success).
    """
    _check_split(split, "textarena_env")
    if isinstance(opponent, str):
        if opponent not in OPPONENTS:
            raise ConfigError(f"textarena_env: opponent must be a callable or one of {sorted(OPPONENTS)}, got {opponent!r}")
        opponent = OPPONENTS[opponent]
    ta = _import("textarena")
    players = num_players if num_players is not None else (2 if opponent is not None else 1)
    if players > 1 and opponent is None:
        raise ConfigError(
            f"textarena_env({env_id!r}) with {players} players: pass opponent= (a callable "
            "seen_text -> action, e.g. first_available_move or a function that asks another model) "
            "so the learner plays one seat"
        )
    if not 0 <= player_id < players:
        raise ConfigError(f"textarena_env: player_id must be in [0, {players}), got {player_id}")
    raw_id = env_id if env_id.endswith("-raw") else f"{env_id}-raw"
    with global_random_lock():
        game = ta.make(raw_id)  # type: ignore[attr-defined]
    adapter_kwargs.setdefault("global_random", True)
    return EnvAdapter(
        TextArenaGame(game, num_players=players, player_id=player_id, opponent=opponent or first_available_move),
        name=f"textarena/{env_id}", split=split, **adapter_kwargs,  # type: ignore[arg-type]
    )


# -- reasoning-gym -----------------------------------------------------------------------


class ReasoningGymTasks:
    """A reasoning-gym dataset as a one-turn env: ``reset(seed)`` draws an entry, ``step`` scores the answer."""

    ANSWER_FORMAT = "Give only your final answer inside <answer></answer> tags."

    def __init__(self, name: str, *, size: int, seed: int, config: Mapping[str, object]) -> None:
        rg = _import("reasoning-gym")
        self.dataset = rg.create_dataset(name, size=size, seed=seed, **config)  # type: ignore[attr-defined]
        self.size = size
        self.rng = np.random.default_rng()
        self.entry: dict[str, object] = {}

    def reset(self, seed: int | None = None) -> tuple[list[Message], dict[str, JSONValue]]:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        index = int(self.rng.integers(self.size))
        self.entry = self.dataset[index]
        prompt = f"{self.entry['question'].strip()}\n\n{self.ANSWER_FORMAT}"  # type: ignore[union-attr]
        return [{"role": "user", "content": prompt}], {"index": index}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, JSONValue]]:
        tagged = answer_tag(action)
        answer = tagged if tagged is not None else action.strip()
        score = float(self.dataset.score_answer(answer, self.entry))
        return "", score, True, False, {"answer": answer, "reference": str(self.entry.get("answer"))}


def reasoning_gym_env(
    name: str, *, split: str = "train", size: int = 1000, **config: object
) -> EnvAdapter:
    """A reasoning-gym dataset (``reasoning_gym.create_dataset(name, ...)``) as a one-turn env.

    The train and held-out splits are the same generator with different dataset seeds.
    Success: score 1.0 (reasoning-gym gives partial credit, e.g. for an answer that
    contains the right one among other text).

    Args:
        name: A reasoning-gym dataset name, e.g. ``"leg_counting"``.
        split: ``"train"`` (dataset seed 0) or ``"heldout"`` (dataset seed 1).
        size: Entries in the dataset.
        config: The dataset's own options (``min_animals=3``, ...).
    """
    _check_split(split, "reasoning_gym_env")
    return EnvAdapter(
        ReasoningGymTasks(name, size=size, seed=SPLITS.index(split), config=config),
        name=f"reasoning-gym/{name}", split=split, global_random=False,
    )


# -- Gymnasium ids -----------------------------------------------------------------------


def registered_ids(prefix: str) -> list[str]:
    """The taurl Gymnasium ids of every env of a package (imports the package)."""
    if prefix == "gem":
        gem = _import("gem")
        return [f"gem/{i.replace(':', '.', 1)}" for i in gem.envs.registration.ENV_REGISTRY]  # type: ignore[attr-defined]
    if prefix == "textarena":
        ta = _import("textarena")
        from textarena.envs.registration import ENV_REGISTRY

        del ta
        return [f"textarena/{i}" for i in ENV_REGISTRY if not re.search(r"-(raw|train)$", i)]
    if prefix == "reasoning-gym":
        _import("reasoning-gym")
        from reasoning_gym.factory import DATASETS

        return [f"reasoning-gym/{name}-v0" for name in DATASETS]
    if prefix == "skyrl":
        skyrl_gym = _import("skyrl")
        return [f"skyrl/{name}-v0" for name in skyrl_gym.envs.registration.registry]  # type: ignore[attr-defined]
    raise ConfigError(f"unknown package {prefix!r}; expected one of {sorted(PACKAGES)}")


def make_thirdparty(name: str, **kwargs: object) -> EnvAdapter:
    """``gymnasium.make``'s entry point for ``<package>/<id>`` names (see :func:`register_thirdparty`)."""
    prefix, _, rest = name.partition("/")
    if prefix == "gem":
        return gem_env(rest, **kwargs)
    if prefix == "textarena":
        return textarena_env(rest, **kwargs)
    if prefix == "reasoning-gym":
        return reasoning_gym_env(rest.removesuffix("-v0"), **kwargs)
    if prefix == "skyrl":
        return skyrl_env(rest.removesuffix("-v0"), **kwargs)
    raise ConfigError(f"unknown third-party env id {name!r}; expected one of {sorted(PACKAGES)} before the '/'")


def register_thirdparty(prefix: str) -> list[str]:
    """Register every env of a package with Gymnasium as ``<prefix>/<id>``; returns the ids.

    E.g. ``register_thirdparty("gem")`` makes ``gymnasium.make("gem/game.Sudoku-v0-easy")``
    work. Imports the package.
    """
    from taurl.envs import register_env

    ids = registered_ids(prefix)
    for taurl_id in ids:
        register_env(taurl_id, make_thirdparty, name=taurl_id)
    return ids
