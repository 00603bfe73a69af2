#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, train an agent that acts (GRPO + LoRA on
# Qwen2.5-Coder-0.5B-Instruct through vLLM: call the calculator, read its result, submit it;
# a 40-min budget, ~45 min on 2 CPU cores, + ~10 min of eval), then evaluate base vs trained on 100 held-out tasks (greedy,
# paired) and draw the curves.
# Extra args are key=value overrides of the training config, e.g. iterations=2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
RUN=runs/grpo-agent-calculator
for arg in "$@"; do case "$arg" in run_dir=*) RUN=${arg#run_dir=};; esac; done
if [ -f "$RUN/checkpoints/latest" ]; then
  .venv/bin/taurl train --resume "$RUN"
else
  .venv/bin/taurl train examples/grpo_agent_calculator.yaml "$@"
fi
TRAINED="$RUN/checkpoints/$(cat "$RUN/checkpoints/latest")/policy"
.venv/bin/taurl eval --model qwen2.5-coder-0.5b --compare "$TRAINED" --env taurl/CalculatorAgent-v0 \
  --split heldout --episodes 100 --max-turns 4 --max-tokens 128 --no-progress --out "$RUN/eval" \
  eval.agent.max_context_tokens=2048
.venv/bin/taurl plot "$RUN"
.venv/bin/taurl diagnose "$RUN"
