#!/usr/bin/env bash
# realign vs PyTorch on the same shapes, one after the other, on this machine:
#   train:   LoRA r 16 on q,k,v,o,gate,up,down, SmolLM2-135M f32, batch 8 x 128, AdamW
#            (`realign bench train` vs transformers + peft)
#   prefill: batch 8 x 128, logits at every position, and batch 2 x 1024, the last logits only
#            (`realign bench forward`'s prefill_tokens_per_s and prefill_long_tokens_per_s vs
#            transformers)
#   decode:  greedy generation, 64 new tokens: batch 1 in f32 and in bf16, batch 16 and 32 in f32
#            (`realign bench forward`'s decode metrics vs transformers' generate)
#   gemm:    the prefill's matrix products alone, x W^T with 1,024 rows on SmolLM2's shapes, GFLOP/s
#            (`realign bench gemm` vs torch.nn.functional.linear); only with --only gemm
# Prints each pair with its ratio (realign / torch; > 1 means realign is faster). Not part of CI.
#
# Usage: scripts/bench-vs-torch.sh [--install] [--threads N] [--repeats N] [--model PATH]
#                                  [--realign BIN] [--only train|forward|gemm] [--rounds N]
#   --install    create .cache/torch-venv and pip-install torch, transformers, peft, gguf into it
#                (once; several GB with torch's CUDA dependencies from PyPI). Without it the
#                venv must exist.
#   --threads N  threads for both sides (RAYON_NUM_THREADS / torch.set_num_threads) [default 2]
#   --repeats N  timed repetitions, best reported, after one warm-up [default 3]
#   --model P    GGUF file or HF folder [default .cache/realign/models/SmolLM2-135M-Instruct.Q4_1.gguf,
#                fetched by scripts/setup.sh]; transformers dequantises the GGUF to f32 as realign does
#   --realign B  the realign binary [default target/release/realign, built if missing]
#   --only W     train or forward only, or gemm (not run without it)
#   --rounds N   run each pair N times, torch first in odd rounds and realign first in even ones,
#                and print the median of the N same-round ratios with each round's ratio
#                [default 1]. On a machine whose speed drifts (shared hosts: one run to the next
#                can differ by 40 %), the paired ratios are the figure to quote.
# Measure on an idle machine: both sides are compute-bound and share the cores with anything else.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPT_DIR")"
VENV="$REPO_ROOT/.cache/torch-venv"
THREADS=2
REPEATS=3
ROUNDS=1
MODEL="$REPO_ROOT/.cache/realign/models/SmolLM2-135M-Instruct.Q4_1.gguf"
REALIGN="$REPO_ROOT/target/release/realign"
INSTALL=0
ONLY=""

die() { echo "bench-vs-torch.sh: error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --install) INSTALL=1 ;;
        --threads) THREADS="${2:?}"; shift ;;
        --repeats) REPEATS="${2:?}"; shift ;;
        --rounds) ROUNDS="${2:?}"; shift ;;
        --model) MODEL="${2:?}"; shift ;;
        --realign) REALIGN="${2:?}"; shift ;;
        --only) ONLY="${2:?}"; shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
case "$ONLY" in ""|train|forward|gemm) ;; *) die "--only takes train, forward or gemm" ;; esac
case "$ROUNDS" in ''|*[!0-9]*|0) die "--rounds takes a whole number of at least 1" ;; esac
[ -e "$MODEL" ] || die "no model at $MODEL (run scripts/setup.sh, or pass --model)"

if [ "$INSTALL" = 1 ] && [ ! -x "$VENV/bin/python" -o ! -e "$VENV/.installed" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet torch transformers peft gguf
    touch "$VENV/.installed"
fi
[ -e "$VENV/.installed" ] || die "no PyTorch venv at $VENV: run with --install once"

if [ ! -x "$REALIGN" ]; then
    (cd "$REPO_ROOT" && cargo build --release --quiet)
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"

run_torch() { # name, torch --only, round
    echo "== $1 (round $3): torch" >&2
    "$VENV/bin/python" "$SCRIPT_DIR/torch_reference.py" --model "$MODEL" --threads "$THREADS" \
        --repeats "$REPEATS" --only "$2" | tee "$TMP/torch-$1-$3.jsonl" >&2
}
run_realign() { # name, realign bench, round
    echo "== $1 (round $3): realign" >&2
    local model_args=()
    # `bench gemm` loads no model (it takes SmolLM2's shapes) and refuses --model
    [ "$2" != gemm ] && [ "$MODEL" != "$REPO_ROOT/.cache/realign/models/SmolLM2-135M-Instruct.Q4_1.gguf" ] && model_args=(--model "$MODEL")
    "$REALIGN" bench "$2" --repeats "$REPEATS" "${model_args[@]}" | tee "$TMP/realign-$1-$3.jsonl" >&2
}

run_pair() { # name, realign bench, torch --only, metrics...
    local name="$1" bench="$2" only="$3" round m
    shift 3
    # Odd rounds run torch first, even rounds realign first, so a drift of the machine's speed
    # during the run falls on both sides alike.
    for round in $(seq 1 "$ROUNDS"); do
        if [ $((round % 2)) = 1 ]; then
            run_torch "$name" "$only" "$round"; run_realign "$name" "$bench" "$round"
        else
            run_realign "$name" "$bench" "$round"; run_torch "$name" "$only" "$round"
        fi
    done
    for m in "$@"; do
        "$VENV/bin/python" - "$TMP" "$name" "$m" "$ROUNDS" >> "$TMP/table" <<'PY'
import json, statistics, sys
tmp, name, want, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def value(path):
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            f = json.loads(line)
            if f.get("metric") == want:
                return f["value"]
    raise SystemExit(f"bench-vs-torch.sh: error: no {want} in {path}")
pairs = [(value(f"{tmp}/torch-{name}-{i}.jsonl"), value(f"{tmp}/realign-{name}-{i}.jsonl"))
         for i in range(1, rounds + 1)]
ratios = [r / t for t, r in pairs]
line = (f"{name:<10} {want:<32} torch {statistics.median(t for t, _ in pairs):9.1f}  "
        f"realign {statistics.median(r for _, r in pairs):9.1f}  ratio {statistics.median(ratios):.2f}x")
if rounds > 1:
    line += f" (median of {rounds} rounds; per round " + ", ".join(f"{x:.2f}" for x in ratios) + ")"
print(line)
PY
    done
}

[ "$ONLY" = "" ] || [ "$ONLY" = train ] && run_pair train train train train_tokens_per_s
[ "$ONLY" = "" ] || [ "$ONLY" = forward ] && run_pair forward forward forward prefill_tokens_per_s prefill_long_tokens_per_s \
    decode_tokens_per_s decode_bf16_tokens_per_s batched_decode_tokens_per_s batched32_decode_tokens_per_s
[ "$ONLY" = gemm ] && run_pair gemm gemm gemm gate_up_gflops down_gflops q_o_gflops lm_head_gflops
echo "threads $THREADS, best of $REPEATS, $ROUNDS round(s), $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
# The machine, as realign's figures name it (CPU model, logical CPUs, kernels, threads). sed reads
# all of grep's lines (`head -n 1` could close the pipe early: SIGPIPE, and pipefail ends the
# script before the table).
grep -h -o '"host":"[^"]*"' "$TMP"/realign-*.jsonl | sed -n '1{s/^"host":"/host: /; s/"$//; p;}'
cat "$TMP/table"
