#!/usr/bin/env bash
# SN-Tune / RSN-Tune and the papers' Table 4 on any model, as run on Qwen2.5-Coder-0.5B-Instruct in
# docs/results.md ("SN-Tune and RSN-Tune on the same model"):
#
#   1. the safety and foundation sets (`realign neurons detect`, 100 prompts each, content tokens);
#   2. SN-Tune (the safety set) and RSN-Tune (safety minus foundation) at each rate of SN_RATES /
#      RSN_RATES, each measured on the VALIDATION slices only (n = 64 / 64 / 50);
#   3. for each, the smallest rate whose validation HS is at most half the base's (else the
#      largest swept), the paper's Table 4 on the held-out sets: the base, SN-Tune and RSN-Tune,
#      each before and after a plain task fine-tune (200 rows, p = 0; the experiment's settings);
#   4. perplexity on general_text rows 300-331 of the base and the two tuned models.
#
# Usage: bash scripts/sn-tune-table4.sh MODEL OUT
#   MODEL  a Hugging Face folder or a GGUF (a GGUF is first written as an f32 folder with
#          `realign merge`, so that the base and the tuned folders run the same products)
#   OUT    a folder for everything (stages already there are kept: rerun to resume)
# Environment: SN_RATES (default "3e-6 1e-5 3e-5 1e-4"), RSN_RATES ("3e-5 5e-5 1e-4 3e-4"),
# LIMIT (held-out prompts per set, 200), REALIGN (the binary, target/release/realign).
# Prints one summary line per evaluation; the JSON summaries are in OUT/{val,test}-*/summary.json.
set -euo pipefail
MODEL=${1:?usage: bash scripts/sn-tune-table4.sh MODEL OUT}
D=${2:?usage: bash scripts/sn-tune-table4.sh MODEL OUT}
R=${REALIGN:-target/release/realign}
SN_RATES=${SN_RATES:-3e-6 1e-5 3e-5 1e-4}
RSN_RATES=${RSN_RATES:-3e-5 5e-5 1e-4 3e-4}
LIMIT=${LIMIT:-200}
EV="--harmful-max-new-tokens 32 --task-max-new-tokens 8 --benign-max-new-tokens 32"
VAL="--harmful embedded:harmful_val --task embedded:task_val --benign embedded:overrefusal_val --limit 64"
TEST="--harmful embedded:harmful_eval --task embedded:task_eval --benign embedded:overrefusal_eval --limit $LIMIT"
mkdir -p "$D"
say() { echo "[$(date -u +%H:%M:%S)] $*"; }
hs() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['harmfulness_percent'])" "$1"; }
line() {
  python3 - "$1" <<'PY'
import json, os, sys
s = json.load(open(os.path.join(sys.argv[1], "summary.json")))
ci = lambda r: f"[{r['lo']:.1f}, {r['hi']:.1f}]"
h, t, o = s["harmful"], s["task"], s["overrefusal"]
print(f"{os.path.basename(sys.argv[1]):24s} n {h['n']}/{t['n']}/{o['n']}  HS {h['rate']['percent']:.1f} {ci(h['rate'])}"
      f"  non-degenerate {h['nondegenerate_rate']['percent']:.1f}  FA {t['rate']['percent']:.1f} {ci(t['rate'])}"
      f"  OR {o['rate']['percent']:.1f} {ci(o['rate'])}")
PY
}
ev() { # NAME SLICE MODEL [ADAPTER]
  local name=$1 slice=$2 model=$3 adapter=${4:-}
  local args=(--model "$model"); [ -n "$adapter" ] && args+=(--adapter "$adapter")
  [ -f "$D/$name/summary.json" ] || "$R" eval "${args[@]}" $slice $EV -o "$D/$name" --overwrite > "$D/$name.log" 2>&1
  say "$(line "$D/$name")"
}
base=$MODEL
if [ -f "$MODEL" ]; then
  base=$D/base-f32
  [ -d "$base" ] || "$R" merge --model "$MODEL" -o "$base" > "$D/base-f32.log" 2>&1
fi
[ -f "$D/safety.json" ] || "$R" neurons detect --model "$base" --corpus embedded:safety_sft --limit 100 -o "$D/safety.json" > "$D/detect-safety.log" 2>&1
[ -f "$D/foundation.json" ] || "$R" neurons detect --model "$base" --corpus embedded:general_text --limit 100 -o "$D/foundation.json" > "$D/detect-foundation.log" 2>&1
ev val-base "$VAL" "$base"
half=$(python3 -c "print($(hs "$D/val-base/summary.json") / 2)")
choose() { # KIND RATES EXCLUDE...: trains and validates each rate, prints the chosen folder last
  local kind=$1 rates=$2; shift 2
  local chosen=""
  for lr in $rates; do
    [ -d "$D/$kind-$lr" ] || "$R" sn-tune --model "$base" --set "$D/safety.json" "$@" --lr "$lr" --epochs 2 --docs 50 -o "$D/$kind-$lr" > "$D/$kind-$lr.log" 2>&1
    ev "val-$kind-$lr" "$VAL" "$D/$kind-$lr" >&2
    chosen=$kind-$lr
    if python3 -c "import sys; sys.exit(0 if $(hs "$D/val-$kind-$lr/summary.json") <= $half else 1)"; then break; fi
  done
  echo "$chosen"
}
sn=$(choose sn "$SN_RATES")
rsn=$(choose rsn "$RSN_RATES" --exclude "$D/foundation.json")
say "chosen on validation: $sn, $rsn"
[ -f "$D/mix0.jsonl" ] || "$R" data mix --p 0 --n 200 --seed 42 -o "$D/mix0.jsonl" > "$D/mix0.log" 2>&1
for m in base "$sn" "$rsn"; do
  src=$D/$m; [ "$m" = base ] && src=$base
  cat > "$D/ft-$m.toml" <<TOML
method = "sft"
model = "$src"
output = "$D/ft-$m"
seed = 42

[lora]
r = 16
alpha = 32

[data]
train = "$D/mix0.jsonl"
max_length = 192

[optim]
lr = 2e-4
epochs = 1
batch_size = 8
schedule = "cosine"
warmup_ratio = 0.05
TOML
  [ -f "$D/ft-$m/adapter_model.safetensors" ] || "$R" train --config "$D/ft-$m.toml" > "$D/ft-$m.log" 2>&1
  if [ "$m" = base ]; then ev test-base "$TEST" "$base"; else ev "test-$m" "$TEST" "$D/$m"; fi
  ev "test-ft-$m" "$TEST" "$src" "$D/ft-$m"
  [ -d "$D/ppl-$m" ] || "$R" neurons deactivate --model "$src" --set "$D/safety.json" --variants none --task "" --sample 8 -o "$D/ppl-$m" > "$D/ppl-$m.log" 2>&1
  say "perplexity $m: $(grep -h -o '"perplexity": *[0-9.]*' -r "$D/ppl-$m" | head -1)"
done
