"""Trajectory invariants and the JSONL round trip."""

from __future__ import annotations

import json

import pytest

from taurl.errors import SchemaError, TrajectoryError
from taurl.types import (
    SCHEMA_VERSION,
    Generation,
    SamplingParams,
    Trajectory,
    read_jsonl,
    write_jsonl,
)


def make_traj(**over: object) -> Trajectory:
    # prompt (3 tokens, turn -1) | turn 0: 2 sampled + 2 observation | turn 1: 2 sampled
    fields: dict[str, object] = dict(
        token_ids=[1, 2, 3, 10, 11, 4, 5, 12, 13],
        loss_mask=[0, 0, 0, 1, 1, 0, 0, 1, 1],
        logprobs=[0.0, 0.0, 0.0, -0.5, -1.25, 0.0, 0.0, -0.1, -2.0],
        turn_ids=[-1, -1, -1, 0, 0, 0, 0, 1, 1],
        rewards=[0.25, 1.0],
        episode_return=1.25,
        termination="terminated",
        env_id="taurl/Calculator-v0",
        task_id="train/7",
        seed=7,
        group_id="g0",
        policy_version=3,
        success=True,
        messages=[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        timing={"generate_s": 0.5, "env_s": 0.01},
        info={"drift": False, "tools": [{"name": "calc"}]},
    )
    fields.update(over)
    return Trajectory(**fields)  # type: ignore[arg-type]


def test_valid_trajectory_properties() -> None:
    t = make_traj()
    assert t.num_turns == 2
    assert t.num_sampled_tokens == 4


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"loss_mask": [0] * 8}, "loss_mask has length 8, expected 9"),
        ({"logprobs": [0.0] * 10}, "logprobs has length 10"),
        ({"turn_ids": [-1] * 3 + [0] * 5}, "turn_ids has length 8"),
        ({"loss_mask": [0, 0, 0, 1, 2, 0, 0, 1, 1]}, "loss_mask[4] must be 0 or 1"),
        # a sampled token without a sampler logprob (positive = not a log-probability)
        ({"logprobs": [0.0, 0.0, 0.0, 0.5, -1.0, 0.0, 0.0, -0.1, -2.0]}, "logprobs[3] = 0.5"),
        # mask on a prompt token that carries no logprob is fine only with logprob 0 and a turn;
        # a logprob on an unsampled token is not
        ({"logprobs": [0.0, -0.3, 0.0, -0.5, -1.25, 0.0, 0.0, -0.1, -2.0]}, "logprobs[1] = -0.3"),
        # mask 1 on the prompt (turn -1): the policy did not sample the prompt
        ({"loss_mask": [1, 0, 0, 1, 1, 0, 0, 1, 1],
          "logprobs": [-0.2, 0.0, 0.0, -0.5, -1.25, 0.0, 0.0, -0.1, -2.0]}, "turn_ids[0] = -1"),
        ({"turn_ids": [-1, -1, -1, 0, 0, 1, 1, 0, 0]}, "must not decrease"),
        ({"episode_return": 2.0}, "sum(rewards) = 1.25"),
        ({"termination": "done"}, "termination must be one of"),
        ({"token_ids": [1, 2, 3, 10, -11, 4, 5, 12, 13]}, "token_ids[4]"),
        ({"rewards": [float("nan"), 1.0]}, "rewards must be finite"),
    ],
)
def test_invariants_raise_naming_the_field(over: dict[str, object], needle: str) -> None:
    with pytest.raises(TrajectoryError) as e:
        make_traj(**over)
    assert needle in str(e.value)


def test_jsonl_round_trip_is_lossless(tmp_path) -> None:
    # awkward floats must survive exactly
    t1 = make_traj(logprobs=[0.0, 0.0, 0.0, -1 / 3, -1e-12, 0.0, 0.0, -7.123456789012345, -2.0])
    t2 = make_traj(group_id="g1", success=None, seed=None, info={"nested": {"a": [1, 2.5]}})
    path = tmp_path / "t.jsonl"
    assert write_jsonl([t1, t2], path) == 2
    back = read_jsonl(path)
    assert back == [t1, t2]
    first = json.loads(path.read_text().splitlines()[0])
    assert first["schema_version"] == SCHEMA_VERSION


def test_newer_schema_is_refused_with_the_field_named(tmp_path) -> None:
    d = make_traj().to_dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    path = tmp_path / "new.jsonl"
    path.write_text(json.dumps(d) + "\n")
    with pytest.raises(SchemaError) as e:
        read_jsonl(path)
    msg = str(e.value)
    assert "schema_version" in msg and "upgrade taurl" in msg and "new.jsonl:1" in msg


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.pop("schema_version"), "schema_version"),
        (lambda d: d.pop("turn_ids"), "'turn_ids' is missing"),
        (lambda d: d.update(reward_to_go=[1.0]), "unknown field 'reward_to_go'"),
        (lambda d: d.update(loss_mask=d["loss_mask"][:-1]), "loss_mask has length"),
    ],
)
def test_wrong_schema_names_the_field(mutate, needle: str) -> None:
    d = make_traj().to_dict()
    mutate(d)
    with pytest.raises(SchemaError) as e:
        Trajectory.from_dict(d)
    assert needle in str(e.value)


def test_bad_json_line_is_a_schema_error(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(make_traj().to_json() + "\n{not json\n")
    with pytest.raises(SchemaError, match="bad.jsonl:2"):
        read_jsonl(path)


def test_sampling_and_generation_validation() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="one logprob per sampled token"):
        Generation(token_ids=[1, 2], logprobs=[-0.1], finish_reason="stop")
