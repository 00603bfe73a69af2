#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# vLLM on CPU: 1 GiB of KV cache per engine is plenty for the tests' tiny batches.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv/bin/python -m pytest "$@"
