#!/usr/bin/env bash
# The repair half of the experiment, after scripts/pipeline.sh: NLSR (pre-amplification of the
# aligned adapter, safety-critical neurons by the low-rank method and by Wanda, random masks as
# a control, adaptive layer pruning, neuron transplant) and the Safe LoRA baseline, each
# evaluated like the pipeline's stages. Safe LoRA projects the fine-tuning update W_t − W_a and
# is evaluated as W_a plus the projected update. Writes runs/repair_summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
R="${REALIGN_BIN:-cargo run --release --quiet --}"
[ -f runs/attacked/adapter_model.safetensors ] || { echo "run scripts/pipeline.sh first" >&2; exit 1; }
[ -f runs/reference/adapter_model.safetensors ] || $R amplify --aligned runs/dpo --weak runs/sft --beta 0.9 -o runs/reference
for m in low-rank wanda random; do
  # random masks read no data and take a seed; the other methods read 200 harmful samples
  if [ "$m" = random ]; then how=(--seed 42); else how=(--max-samples 200); fi
  [ -f "runs/masks-$m.safetensors" ] || $R identify --adapter runs/reference --method "$m" "${how[@]}" -o "runs/masks-$m.safetensors"
  [ -f "runs/nlsr-$m/adapter_model.safetensors" ] || $R patch --reference runs/reference --finetuned runs/attacked --masks "runs/masks-$m.safetensors" --seed 42 -o "runs/nlsr-$m"
done
[ -f runs/safelora/adapter_model.safetensors ] || $R safelora --aligned runs/dpo --finetuned runs/attacked --update-from runs/dpo --threshold 0.5 -o runs/safelora
eval_all() { # name, adapters... -> runs/eval-NAME/{summary.json,harmful.jsonl,task.jsonl}
  local name=$1; shift
  [ -f "runs/eval-$name/summary.json" ] && return
  local ads=(); for a in "$@"; do ads+=(--adapter "$a"); done
  echo "== $name"
  $R eval "${ads[@]}" --merge --harmful-max-new-tokens 48 --overwrite -o "runs/eval-$name"
}
for m in low-rank wanda random; do eval_all "nlsr-$m" "runs/nlsr-$m"; done
eval_all safelora runs/dpo runs/safelora
python3 - <<'PY'
import json
names = ["aligned", "attacked", "safelora", "nlsr-low-rank", "nlsr-wanda", "nlsr-random"]
rows = {}
for n in names:
    try:
        s = json.load(open(f"runs/eval-{n}/summary.json"))
    except FileNotFoundError:
        continue
    rows[n] = {"harmfulness_percent": s["harmfulness_percent"], "task_accuracy_percent": s["accuracy_percent"]}
json.dump(rows, open("runs/repair_summary.json", "w"), indent=2)
print(f"{'model':<14} {'HS %':>6} {'FA %':>8}")
for k, v in rows.items():
    print(f"{k:<14} {v['harmfulness_percent']:>6.1f} {v['task_accuracy_percent']:>8.1f}")
PY
