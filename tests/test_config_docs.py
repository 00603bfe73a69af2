"""The config docs that list a registry's names stay equal to the registry."""

from __future__ import annotations

import inspect
import re

import pytest

from taurl.agents import config as agent_config
from taurl.learners import PRESETS, advantages, config, losses, options


def _listed(module: object, field: str) -> set[str]:
    """The ``a | b | c`` names in the doc comment of ``field`` in ``module``'s source: on the
    field's line, or on the comment line above it."""
    src = inspect.getsource(module)
    names = r"#[^:\n]*: ([\w\-]+(?: \| [\w\-]+)+)"
    m = (re.search(rf"^\s*{field}: .*?{names}\s*$", src, re.MULTILINE)
         or re.search(rf"^\s*{names}[^\n]*\n\s*{field}: ", src, re.MULTILINE))
    assert m is not None, f"no `# ...: a | b` doc of `{field}` in {module.__name__}"
    return set(m.group(1).split(" | "))


@pytest.mark.parametrize(("module", "field", "registry"), [
    (options, "advantage", advantages.ESTIMATORS),
    (options, "policy_loss", losses.POLICY_LOSSES),
    (options, "loss_agg", dict.fromkeys(losses.AGGREGATIONS)),
    (config, "algorithm", PRESETS),
    (agent_config, "kind", agent_config.BACKENDS),
])
def test_documented_choices_match_the_registry(module: object, field: str, registry: dict) -> None:
    assert _listed(module, field) == set(registry)
