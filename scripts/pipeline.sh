#!/usr/bin/env bash
# The alignment/attack half of the experiment on the embedded default (SmolLM2-135M-Instruct):
# SFT (W_0) -> DPO (W_a) -> harmful fine-tuning attack (W_t, p = 0.1), with the harmfulness
# score (keyword judge, 200 held-out harmful prompts) and sentiment accuracy (500 held-out items)
# of each stage. Writes runs/pipeline_summary.json. About 40 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
# REALIGN_BIN: a built binary to use instead of `cargo run` (so edits during a run do not rebuild it).
R="${REALIGN_BIN:-cargo run --release --quiet --}"
mkdir -p runs
# A stage whose adapter is already there is skipped, so an interrupted pipeline continues.
stage() { # name, config
  [ -f "runs/$1/adapter_model.safetensors" ] || $R train --config "$2" > "runs/$1.report.json"
}
stage sft configs/sft.toml
stage dpo configs/dpo.toml
$R data mix --task embedded:task_train --harmful embedded:harmful_attack --n 1000 --p 0.1 --seed 42 --overwrite -o runs/attack.jsonl
stage attacked configs/attack.toml
eval_all() { # name, adapters... -> runs/eval-NAME/{summary.json,harmful.jsonl,task.jsonl}
  local name=$1; shift
  local ads=(); for a in "$@"; do ads+=(--adapter "$a"); done
  echo "== $name"
  $R eval "${ads[@]}" --merge --harmful-max-new-tokens 48 --overwrite -o "runs/eval-$name"
}
eval_all base
eval_all sft runs/sft
eval_all aligned runs/dpo
eval_all attacked runs/attacked
python3 - <<'PY'
import json
rows = {}
for name in ["base", "sft", "aligned", "attacked"]:
    s = json.load(open(f"runs/eval-{name}/summary.json"))
    rows[name] = {"harmfulness_percent": s["harmfulness_percent"], "task_accuracy_percent": s["accuracy_percent"], "n_harmful": s["harmful"]["n"], "n_task": s["task"]["n"]}
json.dump(rows, open("runs/pipeline_summary.json", "w"), indent=2)
print(f"{'model':<10} {'HS %':>6} {'FA %':>8}")
for k, v in rows.items():
    print(f"{k:<10} {v['harmfulness_percent']:>6.1f} {v['task_accuracy_percent']:>8.1f}")
PY
