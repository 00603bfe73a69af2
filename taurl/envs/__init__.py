"""Gymnasium multi-turn text environments, their tools, and the env checker.

Importing this package registers the built-in environments with Gymnasium (through
entry-point strings, so no environment module is imported until it is made)::

    import gymnasium, taurl.envs
    env = gymnasium.make("taurl/Calculator-v0", split="heldout")

==============================  =====================================  ============
id                              task                                   turn rewards
==============================  =====================================  ============
``taurl/Calculator-v0``         arithmetic with a ``calculator`` tool  final answer
``taurl/CalculatorAgent-v0``    3-digit products: the tool pays        final answer
``taurl/SQL-v0``                questions over a shipped SQLite DB     final answer
``taurl/GuessNumber-v0``        guess the number, told higher/lower    every turn
``taurl/Code-v0``               write code that passes tests           final answer
``taurl/Web-v0``                find facts on a local web site         final answer
==============================  =====================================  ============

Environments of other packages (each imported only when made; ``pip install
'taurl[ecosystem]'``, see :mod:`taurl.envs.thirdparty`): ``skyrl/gsm8k-v0``,
``skyrl/gsm8k_multi_turn-v0``, ``gem/game.GuessTheNumber-v0-easy``,
``gem/game.Mastermind-v0-easy``, ``textarena/FifteenPuzzle-v0``,
``textarena/TicTacToe-v0`` (against a fixed opponent), ``reasoning-gym/leg_counting-v0``,
``reasoning-gym/basic_arithmetic-v0``; :func:`~taurl.envs.thirdparty.register_thirdparty`
registers the rest. :class:`EnvAdapter` wraps any other ``reset``/``step`` env.

The environment contract is in :mod:`taurl.envs.base`; tools and their schemas in
:mod:`taurl.envs.tools`, tool-call parsing in :mod:`taurl.envs.tool_parsing`, running
calls in :mod:`taurl.envs.tool_execution`.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium

from taurl.envs.adapter import EnvAdapter, StepResult, TextEnvAdapter, global_random_lock
from taurl.envs.base import SPLITS, Task, TextEnv, ToolEnv, Turn, answer_tag, last_number, user
from taurl.envs.checker import EpisodeResult, check_env, run_episode
from taurl.envs.spaces import MessagesSpace, TextSpace
from taurl.envs.tool_execution import ToolResult, call_tool, validate_arguments
from taurl.envs.tool_parsing import (
    LenientToolCallParser,
    TagToolCallParser,
    ToolCall,
    ToolCallParser,
)
from taurl.envs.tools import Tool, format_tool_prompt

__all__ = [
    "SPLITS",
    "EnvAdapter",
    "EpisodeResult",
    "LenientToolCallParser",
    "MessagesSpace",
    "StepResult",
    "TagToolCallParser",
    "Task",
    "TextEnv",
    "TextEnvAdapter",
    "TextSpace",
    "Tool",
    "ToolCall",
    "ToolCallParser",
    "ToolEnv",
    "ToolResult",
    "Turn",
    "answer_tag",
    "call_tool",
    "check_env",
    "format_tool_prompt",
    "global_random_lock",
    "last_number",
    "register_env",
    "run_episode",
    "user",
    "validate_arguments",
]


def register_env(env_id: str, entry_point: str | Callable[..., gymnasium.Env], **kwargs: object) -> None:
    """Register an environment with Gymnasium the way taurl's own are registered.

    Gymnasium's order-enforcing wrapper is turned off because taurl environments
    enforce reset/step order themselves and raise :class:`~taurl.errors.EnvError`;
    ``kwargs`` become default constructor arguments (``gymnasium.make`` overrides them).
    Registering an id again replaces the earlier entry.
    """
    if env_id in gymnasium.registry:
        del gymnasium.registry[env_id]
    gymnasium.register(id=env_id, entry_point=entry_point, order_enforce=False, kwargs=dict(kwargs))


register_env("taurl/Calculator-v0", "taurl.envs.calculator:CalculatorEnv")
# The calculator for agents that act: 3-digit products (held-out: one 4-digit operand), as
# expressions and word problems, with a final_answer tool. A 0.5B model cannot multiply
# these in its head, so calling the calculator and reading its result is the way.
register_env(
    "taurl/CalculatorAgent-v0", "taurl.envs.calculator:CalculatorEnv",
    min_value=100, max_value=999, operations="*", style="mixed", answer_tool=True, max_turns=4,
)
register_env("taurl/SQL-v0", "taurl.envs.sql:SQLEnv")
register_env("taurl/GuessNumber-v0", "taurl.envs.game:GuessNumberEnv")
# Code-v0 and Web-v0 live in modules built on taurl.envs.base by the sandbox work.
register_env("taurl/Code-v0", "taurl.envs.code:CodeEnv")
register_env("taurl/Web-v0", "taurl.envs.web:WebEnv")

# Other packages' envs, made through taurl.envs.thirdparty (which imports each package only
# when one of its envs is made). GEM's "category:Name" ids become "gem/category.Name"
# because Gymnasium reads "module:EnvId" as "import module".
for _id in (
    "skyrl/gsm8k-v0", "skyrl/gsm8k_multi_turn-v0",
    "gem/game.GuessTheNumber-v0-easy", "gem/game.Mastermind-v0-easy",
    "textarena/FifteenPuzzle-v0", "reasoning-gym/leg_counting-v0", "reasoning-gym/basic_arithmetic-v0",
):
    register_env(_id, "taurl.envs.thirdparty:make_thirdparty", name=_id)
register_env(
    "textarena/TicTacToe-v0", "taurl.envs.thirdparty:make_thirdparty",
    name="textarena/TicTacToe-v0", opponent="first_available_move",
)
