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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, load_model, save_file

from taurl.errors import CheckpointError, ConfigError
from taurl.learners import distributed as D

if TYPE_CHECKING:
    from taurl.learners.learner import Learner

STATE_FILE = "learner_state.json"
POLICY_PREFIX = "policy."  # the policy's weights' names in the learner's state dict


@dataclass
class Snapshot:
    """A learner's checkpoint held in memory: copies, so training can go on while it is written."""

    weights: dict[str, torch.Tensor]  # trained modules' weights, tied tensors once
    metadata: dict[str, str]  # safetensors metadata: each tied name → the name kept
    optimizer: dict[str, object]  # torch.optim state-dict format
    rng: dict[str, object]
    state: dict[str, object]  # learner_state.json (``weights_from``: the weights are elsewhere)


def save(learner: Learner, directory: Path) -> None:
    """Write ``learner``'s checkpoint into ``directory``.

    Under torchrun every rank calls it (FSDP2 gathers the shards); rank 0 writes,
    in the same format as a single process (a checkpoint resumes with any number
    of processes), and every rank returns once the files are complete.
    """
    snap = snapshot(learner, copy=False)  # written before the learner changes
    if snap is not None:
        write(snap, Path(directory))
    D.barrier()


def snapshot(learner: Learner, copy: bool = True, weights_from: str | None = None) -> Snapshot | None:
    """What :func:`write` saves (every rank calls it; None off rank 0).

    ``copy``: copies of the tensors, which cost memory (the trained weights and the
    optimizer state once more) and a memory copy's time, and let :func:`write` run in a
    background thread while training goes on; without, the learner's own tensors.
    ``weights_from``: the trained weights are not written but read back from that
    safetensors file (relative to the checkpoint folder), which holds the policy's weights
    under Hugging Face names — for a caller that writes them there and has checked that
    they are all the trained weights (:func:`policy_is_all_weights`).
    """
    metadata: dict[str, str] = {}
    if learner.parallel == "fsdp2":
        weights, optimizer = _gather_fsdp_state(learner)  # already full copies, on rank 0
    else:
        weights, metadata = ({}, {}) if weights_from else _untied(
            learner.trained_modules.state_dict(), copy)
        optimizer = learner.optimizer.state_dict()
        optimizer = _copy_tensors(optimizer) if copy else optimizer
    if not D.is_main():
        return None
    rng = {"torch": torch.get_rng_state(), "shuffle": learner._shuffle.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state: dict[str, object] = {
        "policy_version": learner.policy_version, "algorithm": learner.config.algorithm,
        "options": dataclasses.asdict(learner.options)}
    if weights and weights_from:
        raise ValueError("weights_from applies to a single process or DDP, not FSDP2")
    if weights_from:
        state["weights_from"] = {"file": weights_from, "prefix": POLICY_PREFIX}
    return Snapshot(weights, metadata, optimizer, rng, state)


def policy_is_all_weights(learner: Learner) -> bool:
    """The learner's float32 policy export (Hugging Face names, ``export_state_dict``) holds
    every trained weight itself, so a checkpoint can keep the weights once, in the policy's
    file: each of the learner's tensors is one of the export's, under its name with the
    ``policy.`` prefix or tied to it. Not so under LoRA (merged copies), with a value head
    or critic (weights the policy lacks) or FSDP2 (shards; not exported here)."""
    if learner.parallel == "fsdp2":
        return False
    from taurl.learners.model import export_state_dict

    policy = export_state_dict(learner.model, torch.float32, copy=False)
    mine = learner.trained_modules.state_dict()
    where = {(v.data_ptr(), v.dtype, tuple(v.shape)) for v in policy.values()}
    return all(
        isinstance(mine.get(POLICY_PREFIX + k), torch.Tensor)
        and mine[POLICY_PREFIX + k].data_ptr() == v.data_ptr() for k, v in policy.items()
    ) and all((v.data_ptr(), v.dtype, tuple(v.shape)) in where for v in mine.values())


def saved_weights(directory: Path) -> dict[str, torch.Tensor]:
    """A checkpoint folder's trained weights under the learner's names (tied ones once),
    wherever they were written (``model.safetensors``, or the policy's file)."""
    d = Path(directory)
    state = json.loads((d / STATE_FILE).read_text()) if (d / STATE_FILE).is_file() else {}
    source = state.get("weights_from")
    if not source:
        return load_file(d / "model.safetensors")
    return {source["prefix"] + k: v for k, v in load_file(d / source["file"]).items()}


def write(snap: Snapshot, d: Path) -> None:
    """Write a :class:`Snapshot`'s files into ``d`` (from any thread)."""
    d.mkdir(parents=True, exist_ok=True)
    if "weights_from" not in snap.state:
        save_file(snap.weights, str(d / "model.safetensors"),
                  metadata={**snap.metadata, "format": "pt"})
    torch.save(snap.optimizer, d / "optimizer.pt")
    torch.save(snap.rng, d / "rng.pt")
    (d / STATE_FILE).write_text(json.dumps(snap.state, indent=1))


def _untied(state: dict[str, torch.Tensor], copy: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` contiguous (copies with ``copy``) with each tied tensor once, under its first
    name in sorted order (as ``safetensors.torch.save_model`` keeps it; ``load_model`` takes
    any), and the metadata ``save_model`` writes (each dropped name → the name kept)."""
    tied: dict[tuple[object, ...], list[str]] = defaultdict(list)
    for k, v in state.items():
        where = (v.untyped_storage().data_ptr(), v.storage_offset(), *v.shape) if v.numel() else (k,)
        tied[where].append(k)
    weights, metadata = {}, {}
    for names in tied.values():
        keep = min(names)
        v = state[keep].detach()
        weights[keep] = v.clone(memory_format=torch.contiguous_format) if copy else v.contiguous()
        metadata.update(dict.fromkeys((n for n in names if n != keep), keep))
    return weights, metadata


def _copy_tensors(obj: object) -> object:
    """``obj`` (nested dicts and lists) with every tensor copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copy_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_copy_tensors(v) for v in obj)
    return obj


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
        _load_fsdp_state(learner, saved_weights(d), optimizer)
    elif "weights_from" in state:  # the policy's file: each tied group once, under any name
        learner.trained_modules.load_state_dict(_with_tied(learner, saved_weights(d)))
        learner.optimizer.load_state_dict(optimizer)
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


def _with_tied(learner: Learner, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` (each tied group once, under any of its names) under every name of the
    learner's state dict."""
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
    return full


def _load_fsdp_state(learner: Learner, weights: dict[str, torch.Tensor],
                     optimizer: dict[str, object]) -> None:
    """FSDP2, every rank: load full weights and optimizer state into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(learner.trained_modules, _with_tied(learner, weights), options=options)
    names = _param_names(learner)
    by_name = {
        "state": {names[i]: st for i, st in optimizer["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                         for g in optimizer["param_groups"]],
    }
    set_optimizer_state_dict(learner.trained_modules, learner.optimizer, by_name, options=options)
