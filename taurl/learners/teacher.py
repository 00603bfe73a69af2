"""Teachers for on-policy distillation: a token-exact log-prob of the student's own tokens.

Three sources (``options.teacher``):

- ``model``: another causal LM loaded from ``options.teacher_path`` and run in torch
  on the learner. It must share the student's tokenizer (the same token ids mean
  the same strings), else :class:`TokenizerMismatchError`.
- ``privileged``: the policy's own frozen base model, shown privileged context the
  environment put in ``Trajectory.info["privileged_context"]`` (e.g. the reference
  solution). The context is rendered as an extra system message by the tokenizer's
  chat template and inserted before the student's exact tokens; the teacher's
  log-probs are then read back at the student's positions (:func:`align_to_student`).
- ``precomputed``: ``Trajectory.info["teacher_logprobs"]``, a list aligned with
  ``token_ids``, filled by whoever has an inference engine (e.g. vLLM with prompt
  logprobs). The learner never imports an engine itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from taurl.errors import ConfigError, TrajectoryError
from taurl.learners.batch import PRIVILEGED_CONTEXT_KEY
from taurl.types import Trajectory

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TokenizerMismatchError(ConfigError):
    """Student and teacher tokenize differently, so per-token log-probs cannot be compared."""


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in model folder ``path``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path))


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase,
                         student_path: str, teacher_path: str) -> None:
    """Raise TokenizerMismatchError unless both tokenizers map the same strings to the same ids."""
    s_vocab = student.get_vocab()
    t_vocab = teacher.get_vocab()
    if s_vocab == t_vocab:
        return
    differ = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))[:3]
    raise TokenizerMismatchError(
        f"the teacher at {teacher_path} and the student at {student_path} do not share a "
        f"tokenizer (vocabularies of {len(t_vocab)} and {len(s_vocab)} tokens; first "
        f"differences: {differ}); on-policy distillation scores the student's token ids "
        "with the teacher, so pick a teacher of the same model family (same tokenizer)"
    )


def privileged_prefix(tokenizer: PreTrainedTokenizerBase, context: str) -> list[int]:
    """Token ids of ``context`` rendered as one system message by the chat template."""
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": context}], tokenize=False, add_generation_prompt=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def privileged_contexts(trajectories: list[Trajectory]) -> list[str]:
    """``info["privileged_context"]`` of every trajectory; a clear error when one lacks it."""
    out = []
    for b, traj in enumerate(trajectories):
        ctx = traj.info.get(PRIVILEGED_CONTEXT_KEY)
        if not isinstance(ctx, str) or not ctx:
            raise TrajectoryError(
                f"trajectory {b} (env {traj.env_id!r}, task {traj.task_id!r}) has no "
                f"info[{PRIVILEGED_CONTEXT_KEY!r}] string; teacher=privileged needs the "
                "environment to provide it (e.g. the reference solution), or choose "
                "options.teacher=model or precomputed"
            )
        out.append(ctx)
    return out


def teacher_rows(
    token_ids: list[list[int]], prefixes: list[list[int]]
) -> tuple[list[list[int]], list[int]]:
    """The teacher's rows ``prefix + student tokens`` and each row's offset (prefix length)."""
    rows = [p + t for p, t in zip(prefixes, token_ids, strict=True)]
    return rows, [len(p) for p in prefixes]


def align_to_student(
    teacher_logp_B_L: torch.Tensor, offsets_B: list[int], T: int
) -> torch.Tensor:
    """Read the teacher's per-token log-probs back at the student's positions.

    Args:
        teacher_logp_B_L: float [B, L], aligned with the teacher's rows ``prefix + tokens``.
        offsets_B: the prefix length of each row.
        T: the student's padded length.

    Returns:
        float [B, T]: ``out[b, t] = teacher_logp[b, t + offsets[b]]`` (0 past the row).
    """
    out = teacher_logp_B_L.new_zeros(teacher_logp_B_L.shape[0], T)
    for b, off in enumerate(offsets_B):
        n = min(T, teacher_logp_B_L.shape[1] - off)
        out[b, :n] = teacher_logp_B_L[b, off : off + n]
    return out
