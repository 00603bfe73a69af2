"""Typed configs: YAML + key=value overrides, unknown keys and wrong types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from taurl.config import dump_config, load_config, parse_overrides
from taurl.errors import ConfigError
from taurl.types import JSONValue


@dataclass
class Optim:
    lr: float = 1e-6  # learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas


@dataclass
class Demo:
    name: str = "run"  # run name
    iterations: int = 10  # training iterations
    algo: Literal["grpo", "ppo"] = "grpo"  # preset
    seed: int | None = None  # None = random
    bf16: bool = True  # autocast
    envs: list[str] = field(default_factory=lambda: ["taurl/Calculator-v0"])  # env ids
    optim: Optim = field(default_factory=Optim)  # optimiser

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"iterations must be >= 1, got {self.iterations}")


def test_yaml_then_overrides(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("name: a\niterations: 3\noptim:\n  lr: 1e-5\n")
    cfg = load_config(Demo, p, ["optim.lr=2e-5", "algo=ppo", "seed=4", "envs=[a, b]"])
    assert cfg.name == "a" and cfg.iterations == 3 and cfg.algo == "ppo" and cfg.seed == 4
    assert cfg.optim.lr == 2e-5 and cfg.optim.betas == (0.9, 0.999)
    assert cfg.envs == ["a", "b"]


def test_yaml_exponent_without_dot_is_a_float(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-5\n")  # YAML 1.1 reads this as a string
    assert load_config(Demo, p).optim.lr == 1e-5


def test_round_trip_through_yaml(tmp_path) -> None:
    cfg = load_config(Demo, None, ["optim.lr=3e-4", "seed=1"])
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(Demo, tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["iteratons=3"], ["unknown config key 'iteratons'", "did you mean 'iterations'"]),
        (["optim.lrr=1"], ["unknown config key 'optim.lrr'", "did you mean 'lr'"]),
        (["iterations=three"], ["iterations: expected int, got str 'three'"]),
        (["iterations=2.5"], ["iterations: expected int, got float"]),
        (["bf16=maybe"], ["bf16: expected bool"]),
        (["algo=dqn"], ["algo: expected one of 'grpo' | 'ppo', got 'dqn'"]),
        (["optim=3"], ["optim: expected a mapping for Optim"]),
        (["optim.betas=[0.9]"], ["optim.betas"]),
        (["iterations=0"], ["iterations must be >= 1, got 0"]),
        (["noequals"], ["is not key=value"]),
    ],
)
def test_errors_name_the_key_and_expected_type(overrides: list[str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(Demo, None, overrides)
    for needle in needles:
        assert needle in str(e.value)


def test_missing_and_non_mapping_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Demo, tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(Demo, p)


def test_parse_overrides_nests_dotted_keys() -> None:
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@dataclass
class WithOptions:
    options: dict[str, JSONValue] = field(default_factory=dict)  # free-form backend options


def test_json_valued_fields_take_nested_yaml() -> None:
    cfg = load_config(WithOptions, None, ["options.engine={max_num_batched_tokens: 32768}",
                                          "options.dtype=float32"])
    assert cfg.options == {"engine": {"max_num_batched_tokens": 32768}, "dtype": "float32"}


@dataclass
class Outer:
    name: str = "run"  # run name
    optim: Optim = field(default_factory=lambda: Optim(lr=5e-6, betas=(0.8, 0.9)))  # not Optim()'s defaults


def test_a_base_keeps_every_field_the_data_does_not_name(tmp_path) -> None:
    # Without a base, a section given in part is rebuilt from its class's defaults.
    assert load_config(Outer, None, ["optim.lr=1e-5"]).optim == Optim(lr=1e-5)
    # With one, only the named keys change, however deep they are.
    p = tmp_path / "c.yaml"
    p.write_text("name: b\n")
    base = Outer()
    cfg = load_config(Outer, p, ["optim.lr=1e-5"], base=base)
    assert cfg == Outer(name="b", optim=Optim(lr=1e-5, betas=(0.8, 0.9)))
    assert base == Outer()  # not modified
    with pytest.raises(ConfigError, match="iterations must be >= 1, got 0"):  # still validated
        load_config(Demo, None, ["iterations=0"], base=Demo())


def test_every_config_class_rejects_bad_values_with_config_error() -> None:
    """One error type for bad settings (the CLI prints TaurlErrors cleanly, not tracebacks)."""
    from taurl.agents.config import BackendConfig, RayConfig
    from taurl.agents.loop import AgentConfig
    from taurl.envs.sandbox import SandboxConfig, SandboxLimits
    from taurl.errors import ConfigError
    from taurl.rollout.eval import EvalConfig
    from taurl.rollout.runner import RolloutConfig
    from taurl.types import SamplingParams

    bad = [
        lambda: AgentConfig(max_turns=0),
        lambda: SamplingParams(max_tokens=0),
        lambda: SamplingParams(temperature=-1),
        lambda: RolloutConfig(split="dev"),
        lambda: EvalConfig(envs=[]),
        lambda: BackendConfig(kind="nope"),
        lambda: RayConfig(address="nowhere"),
        lambda: RayConfig(num_engines=0),
        lambda: SandboxLimits(timeout_s=0),
        lambda: SandboxConfig(workers=0),
    ]
    for make in bad:
        with pytest.raises(ConfigError):
            make()
