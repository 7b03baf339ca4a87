#!/usr/bin/env bash
# SmolLM2-135M-Instruct: held-out 2-digit addition before and after SFT, then GRPO from the SFT model;
# GSM8K (the first 50 test problems) and MMLU (5 test questions per subject) before and after, as a
# regression check. Each step is cached (a finished stage is not rerun; an interrupted one resumes).
# About 45 minutes on 2 CPU cores (GRPO: 30 steps of 16 prompts x 8 samples, ~19 min).
# Usage: benchmarks/smollm2_align.sh [runs]
set -euo pipefail
runs=${1:-runs}
config=configs/align/smollm2-addition.toml
[ -f "$runs/smollm2/checkpoints/latest" ] || scratchlm import smollm2 --out "$runs/smollm2"
scratchlm align sft --config $config --set init="\"$runs/smollm2\"" --set out_dir="\"$runs/smollm2-sft\""
scratchlm align grpo --config $config --set init="\"$runs/smollm2-sft\"" --set out_dir="\"$runs/smollm2-grpo\"" \
  --set steps=30 --set batch_size=16 --set rollout.group_size=8 --set microbatch_size=32 \
  --set optim.lr=1e-5 --set optim.min_lr=1e-5 --set optim.warmup_steps=0
for stage in base sft grpo; do
  file=$runs/smollm2-$stage-eval.json run=$runs/smollm2-$stage
  [ $stage = base ] && run=$runs/smollm2
  [ -f "$file" ] || { scratchlm align eval --run "$run" --config $config --samples 0 --json > "$file.tmp" && mv "$file.tmp" "$file"; }
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], f\"{r['greedy_accuracy']:.1%}\", r['greedy_interval'], f\"format {r['format_rate']:.1%}\", f\"last number {r['last_number_accuracy']:.1%}\")" "$file" "$stage"
  for bench in "gsm8k --limit 50" "mmlu --limit 5"; do
    file=$runs/smollm2-$stage-${bench%% *}.json
    [ -f "$file" ] || { scratchlm align eval --run "$run" --benchmark $bench --json > "$file.tmp" && mv "$file.tmp" "$file"; }
    python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], r['benchmark'], r['questions'], f\"{r['accuracy']:.1%}\", r['interval'])" "$file" "$stage"
  done
done
