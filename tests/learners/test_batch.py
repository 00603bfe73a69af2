"""learners/batch.py: padding, anchors, micro-batches, minibatches, per-token info, denominators."""

from __future__ import annotations

import pytest
import torch

from taurl.errors import TrajectoryError
from taurl.learners.batch import (
    anchor_keys,
    build_batch,
    global_denominators,
    info_tensor,
    pack_micro_batches,
    split_minibatches,
)
from taurl.learners.teacher import align_to_student, teacher_rows
from taurl.types import Trajectory


def _traj(ids, mask, turns, rewards, group="g") -> Trajectory:
    return Trajectory(token_ids=ids, loss_mask=mask, logprobs=[-1.0 * m for m in mask],
                      turn_ids=turns, rewards=rewards, episode_return=sum(rewards),
                      termination="terminated", group_id=group)


def test_anchor_keys_use_observations_only() -> None:
    # Two trajectories: same prompt (5, 6), different actions, same observation (9, 9):
    # turn 1's observation-so-far is identical, so they share turn 1's anchor.
    a = _traj([5, 6, 1, 2, 9, 9, 3], [0, 0, 1, 1, 0, 0, 1], [-1, -1, 0, 0, 0, 0, 1], [0.0, 1.0])
    b = _traj([5, 6, 4, 9, 9, 8, 8], [0, 0, 1, 0, 0, 1, 1], [-1, -1, 0, 0, 0, 1, 1], [0.0, 0.0])
    c = _traj([5, 6, 4, 7, 7, 8], [0, 0, 1, 0, 0, 1], [-1, -1, 0, 0, 0, 1], [0.0, 0.0])
    assert anchor_keys(a) == [(5, 6), (5, 6, 9, 9)]
    batch = build_batch([a, b, c], torch.device("cpu"))
    anchors = batch.anchor_ids_B_H.tolist()
    assert anchors[0][0] == anchors[1][0] == anchors[2][0]
    assert anchors[0][1] == anchors[1][1] != anchors[2][1]


def test_build_batch_rejects_leading_sampled_token() -> None:
    bad = _traj([1, 2], [1, 0], [0, 0], [1.0])
    with pytest.raises(TrajectoryError, match="starts with a sampled token"):
        build_batch([bad], torch.device("cpu"))


def test_pack_micro_batches_respects_budget() -> None:
    lengths = [10, 3, 7, 10, 2]
    micro = pack_micro_batches([0, 1, 2, 3, 4], lengths, budget=20)
    # longest first: (0, 3) = 2 x 10; (2, 1) = 2 x 7 ... (2, 1, 4) = 3 x 7 = 21 > 20
    assert micro == [[0, 3], [2, 1], [4]]
    assert all(len(m) * max(lengths[r] for r in m) <= 20 for m in micro)
    assert pack_micro_batches([0], [50], budget=20) == [[0]]  # one long row: its own batch


def test_pack_micro_batches_keeps_a_group_together_when_asked() -> None:
    # Rows 0, 2, 4 share a prompt (group 0), rows 1, 3 another (group 1). By length alone the
    # groups mix; by group, each micro-batch holds one group's rows, longest first.
    lengths, groups = [10, 9, 8, 7, 6], [0, 1, 0, 1, 0]
    assert pack_micro_batches(list(range(5)), lengths, budget=30) == [[0, 1, 2], [3, 4]]
    micro = pack_micro_batches(list(range(5)), lengths, budget=30, groups=groups)
    assert micro == [[0, 2, 4], [1, 3]]
    assert all(len(m) * max(lengths[r] for r in m) <= 30 for m in micro)


def test_split_minibatches() -> None:
    assert split_minibatches([4, 3, 2, 1, 0], 2) == [[4, 3, 2], [1, 0]]
    assert split_minibatches([1, 0], 5) == [[1], [0]]


def test_info_tensor_pads_and_names_the_bad_trajectory() -> None:
    a = _traj([5, 6, 1], [0, 0, 1], [-1, -1, 0], [1.0])
    b = _traj([5, 6, 1, 2], [0, 0, 1, 1], [-1, -1, 0, 0], [0.0])
    a.info["teacher_logprobs"] = [0.0, 0.0, -0.5]
    b.info["teacher_logprobs"] = [0.0, 0.0, -1.0, -2.0]
    out = info_tensor([a, b], "teacher_logprobs", 5, torch.device("cpu"))
    assert out.tolist() == [[0.0, 0.0, -0.5, 0.0, 0.0], [0.0, 0.0, -1.0, -2.0, 0.0]]
    b.info["teacher_logprobs"] = [0.0]
    with pytest.raises(TrajectoryError, match=r"trajectory 1 .*list of 4 floats.*got a list of 1"):
        info_tensor([a, b], "teacher_logprobs", 5, torch.device("cpu"))
    del b.info["teacher_logprobs"]
    with pytest.raises(TrajectoryError, match="trajectory 1"):
        info_tensor([a, b], "teacher_logprobs", 5, torch.device("cpu"))


def test_global_denominators_count_sampled_tokens_and_sequences() -> None:
    a = _traj([5, 6, 1, 2, 3], [0, 0, 1, 1, 1], [-1, -1, 0, 0, 0], [1.0])
    b = _traj([5, 6, 1], [0, 0, 1], [-1, -1, 0], [0.0])
    batch = build_batch([a, b], torch.device("cpu"))
    assert global_denominators(batch, [0, 1], 0) == (4, 2, 3)  # longest answer: 3 tokens
    assert global_denominators(batch, [1], 0) == (1, 1, 1)
    assert global_denominators(batch, [0, 1], 16) == (4, 2, 16)  # a fixed length wins


def test_teacher_rows_and_align_to_student_round_trip() -> None:
    tokens = [[5, 6, 1, 2], [5, 6, 3]]
    prefixes = [[9, 9, 9], [8]]
    rows, offsets = teacher_rows(tokens, prefixes)
    assert rows == [[9, 9, 9, 5, 6, 1, 2], [8, 5, 6, 3]] and offsets == [3, 1]
    # a teacher "log-prob" equal to the row position, padded to the longest row
    L = max(len(r) for r in rows)
    teacher = torch.tensor([[float(i) for i in range(L)]] * 2)
    out = align_to_student(teacher, offsets, T=4)
    assert out.tolist() == [[3.0, 4.0, 5.0, 6.0], [1.0, 2.0, 3.0, 4.0]]
    # a teacher row shorter than prefix + T: positions past its end read 0
    assert align_to_student(teacher[:, :5], offsets, T=4).tolist() == [[3.0, 4.0, 0.0, 0.0],
                                                                      [1.0, 2.0, 3.0, 4.0]]
