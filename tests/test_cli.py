"""The `taurl` command line skeleton."""

from __future__ import annotations

import subprocess
import sys

from taurl import __version__
from taurl.cli import main


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "taurl.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"taurl {__version__}"


def test_models_list_and_prepare(capsys) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "tiny-random" in out
    assert main(["models", "prepare", "tiny-random"]) == 0
    assert capsys.readouterr().out.strip().endswith("tiny-random")


def test_unknown_model_is_a_clean_error(capsys) -> None:
    assert main(["models", "prepare", "smolm2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("taurl: error: unknown model 'smolm2'")
