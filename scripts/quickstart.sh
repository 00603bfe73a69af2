#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, train the default config (GRPO on the
# calculator task, SmolLM2-135M-Instruct through vLLM; <= 30 min on 2 CPU cores), then
# evaluate base vs trained on the held-out split and draw the curves.
# Extra args are key=value overrides of the training config, e.g. iterations=2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
RUN=runs/grpo-calculator
for arg in "$@"; do case "$arg" in run_dir=*) RUN=${arg#run_dir=};; esac; done
if [ -f "$RUN/checkpoints/latest" ]; then
  .venv/bin/taurl train --resume "$RUN"
else
  .venv/bin/taurl train examples/grpo_calculator.yaml "$@"
fi
TRAINED="$RUN/checkpoints/$(cat "$RUN/checkpoints/latest")/policy"
.venv/bin/taurl eval --model smollm2-135m --compare "$TRAINED" --env taurl/Calculator-v0 \
  --split heldout --episodes 100 --max-turns 3 --max-tokens 96 --no-progress --out "$RUN/eval"
.venv/bin/taurl plot "$RUN"
.venv/bin/taurl diagnose "$RUN"
