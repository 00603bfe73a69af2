"""Learner checkpoints: weights (safetensors), optimizer, RNG states and the step count.

A checkpoint is written in one format however the learner runs: alone, under DDP, or
sharded by FSDP2 (whose full weights and optimizer state are gathered first, and
scattered back into each rank's shards on load), so a run resumes with any number of
processes. ``Learner.save`` / ``Learner.load`` call :func:`save` / :func:`load`.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from taurl.errors import CheckpointError, ConfigError
from taurl.learners import distributed as D

if TYPE_CHECKING:
    from taurl.learners.learner import Learner

STATE_FILE = "learner_state.json"


def save(learner: Learner, directory: Path) -> None:
    """Write ``learner``'s checkpoint into ``directory``.

    Under torchrun every rank calls it (FSDP2 gathers the shards); rank 0 writes,
    in the same format as a single process (a checkpoint resumes with any number
    of processes), and every rank returns once the files are complete.
    """
    gathered = _gather_fsdp_state(learner) if learner.parallel == "fsdp2" else None
    if D.is_main():
        _write(learner, Path(directory), gathered)
    D.barrier()


def _write(learner: Learner, d: Path,
           gathered: tuple[dict[str, torch.Tensor], dict[str, object]] | None) -> None:
    """Write :func:`save`'s files; ``gathered``: FSDP2's full weights and optimizer."""
    d.mkdir(parents=True, exist_ok=True)
    if gathered is None:
        save_model(learner.trained_modules, str(d / "model.safetensors"))
        torch.save(learner.optimizer.state_dict(), d / "optimizer.pt")
    else:
        save_file(gathered[0], str(d / "model.safetensors"), metadata={"format": "pt"})
        torch.save(gathered[1], d / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "shuffle": learner._shuffle.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, d / "rng.pt")
    state = {"policy_version": learner.policy_version, "algorithm": learner.config.algorithm,
             "options": dataclasses.asdict(learner.options)}
    (d / STATE_FILE).write_text(json.dumps(state, indent=1))


def load(learner: Learner, directory: Path) -> None:
    """Restore a checkpoint written by :func:`save` into a learner with the same config."""
    d = Path(directory)
    if not (d / STATE_FILE).is_file():
        raise CheckpointError(
            f"{d} holds no {STATE_FILE}; is it a Learner.save() folder (a run's "
            "checkpoints/iter-NNNNNN/learner)?"
        )
    state = json.loads((d / STATE_FILE).read_text())
    optimizer = torch.load(d / "optimizer.pt", map_location=learner.device, weights_only=True)
    if learner.parallel == "fsdp2":
        _load_fsdp_state(learner, load_file(d / "model.safetensors"), optimizer)
    else:
        load_model(learner.trained_modules, str(d / "model.safetensors"), device=str(learner.device))
        learner.optimizer.load_state_dict(optimizer)
    rng = torch.load(d / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    learner._shuffle.set_state(rng["shuffle"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    learner.policy_version = int(state["policy_version"])


def _param_names(learner: Learner) -> list[str]:
    """The optimizer's parameters' names in ``learner.trained_modules``, in the optimizer's order."""
    names = {id(p): n for n, p in learner.trained_modules.named_parameters()}
    return [names[id(p)] for g in learner.optimizer.param_groups for p in g["params"]]


def _gather_fsdp_state(learner: Learner) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """FSDP2, every rank: full weights and optimizer state as a single process saves them.

    Weights: tied tensors once, under the name ``safetensors.save_model`` keeps.
    Optimizer: ``torch.optim`` state-dict format (parameters numbered). Both empty
    off rank 0.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    full = D.full_state_dict(learner.trained_modules)
    by_name = get_optimizer_state_dict(
        learner.trained_modules, learner.optimizer,
        options=StateDictOptions(full_state_dict=True, cpu_offload=True),
    )
    if not D.is_main():
        return {}, {}
    tied: dict[int, list[str]] = defaultdict(list)
    for k, v in full.items():
        tied[id(v)].append(k)
    weights = {min(ks): full[ks[0]].contiguous() for ks in tied.values()}
    index = {n: i for i, n in enumerate(_param_names(learner))}
    optimizer = {
        "state": {index[n]: st for n, st in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                         for g in by_name["param_groups"]],
    }
    return weights, optimizer


def _load_fsdp_state(learner: Learner, weights: dict[str, torch.Tensor],
                     optimizer: dict[str, object]) -> None:
    """FSDP2, every rank: load full weights and optimizer state into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    tied: dict[int, list[str]] = defaultdict(list)
    for k, v in learner.trained_modules.state_dict(keep_vars=True).items():
        tied[id(v)].append(k)
    full = {}
    for ks in tied.values():
        saved = [k for k in ks if k in weights]
        if not saved:
            raise ConfigError(f"the checkpoint has no weights for {ks[0]}; was it saved by a "
                              "learner with the same algorithm and model?")
        full.update(dict.fromkeys(ks, weights[saved[0]]))
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(learner.trained_modules, full, options=options)
    names = _param_names(learner)
    by_name = {
        "state": {names[i]: st for i, st in optimizer["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                         for g in optimizer["param_groups"]],
    }
    set_optimizer_state_dict(learner.trained_modules, learner.optimizer, by_name, options=options)
