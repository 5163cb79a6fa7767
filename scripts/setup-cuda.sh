#!/usr/bin/env bash
# A CUDA 13.4 compiler toolchain (nvcc, cicc, ptxas, runtime and C++ headers) from NVIDIA's wheels
# on the Python package index, for compiling the `cuda` feature on a machine without a CUDA
# installation (CI). No GPU and no driver are needed to compile; running needs both.
#
#   bash scripts/setup-cuda.sh                 installs once, prints the environment as `export`s
#   bash scripts/setup-cuda.sh COMMAND ARGS... installs once, runs COMMAND in that environment:
#   bash scripts/setup-cuda.sh cargo check --release --features cuda
#
# The environment: CUDA_ROOT, CUDA_PATH and CUDA_HOME (the toolkit root), NVCC, PATH with the
# toolkit's bin/ first, and CUDA_COMPUTE_CAP (default 80, Ampere; candle-kernels' build script
# reads it instead of asking nvidia-smi for the GPU's). An nvcc already on PATH is not used.
#
# Why CUDA 13 and not the `-cu12` wheels: nvidia-cuda-nvcc-cu12 (every 12.x release) ships only
# ptxas and libnvvm, not the nvcc driver, cicc or cudafe++; the CUDA 13 wheels ship the whole
# compiler. 13.4 is the newest release that cudarc 0.19 (candle 0.11's CUDA binding) knows.
#
# The toolkit goes to $REALIGN_CUDA_CACHE, or <repo>/.cache/cuda-13.4: wheels/ (checksummed
# downloads) and root/ (the unpacked toolkit, ~340 MB). Idempotent: a complete root (its
# .complete stamp names the pinned wheels) is used as it is; otherwise it is unpacked again into
# a temporary folder and renamed into place, so an interrupted run leaves no half toolkit.
#
# Needs python3 with pip, access to the Python package index, and an x86_64 Linux machine with a
# host C++ compiler (g++ 12 here; nvcc 13.4 accepts gcc 6 to 15).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPT_DIR")"
CACHE="${REALIGN_CUDA_CACHE:-$REPO_ROOT/.cache/cuda-13.4}"
PYTHON="${PYTHON:-python3}"

die() {
    echo "setup-cuda.sh: error: $*" >&2
    exit 1
}
say() { echo "setup-cuda.sh: $*" >&2; }

[[ "$(uname -s)-$(uname -m)" == "Linux-x86_64" ]] ||
    die "the pinned CUDA wheels are for x86_64 Linux; this is $(uname -s)-$(uname -m). Install the CUDA toolkit from NVIDIA and set CUDA_ROOT instead."
command -v "$PYTHON" >/dev/null 2>&1 ||
    die "'$PYTHON' was not found. Install Python 3 (with pip), or set PYTHON=/path/to/python3."
"$PYTHON" -m pip --version >/dev/null 2>&1 ||
    die "pip is not available for '$PYTHON'. Install it (e.g. 'apt-get install python3-pip')."
command -v g++ >/dev/null 2>&1 ||
    die "nvcc needs a host C++ compiler and 'g++' was not found (apt-get install g++)."

# name==version, wheel file, SHA-256 (as fetched on 2026-12-01). All five unpack under
# nvidia/cu13/, which is a complete toolkit root (bin/, nvvm/, include/, include/cccl/, lib/).
WHEELS=(
    "nvidia-cuda-nvcc==13.4.92 nvidia_cuda_nvcc-13.4.92-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl a1f3bfb27299e060b444d5df1f4bcd762501326cf0fd3141ed61756816ab9a0e"
    "nvidia-nvvm==13.4.92 nvidia_nvvm-13.4.92-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl e4c81cb321dd9743bcf871c5e7e8fecd7f05dea607944426e102bdda8d49e137"
    "nvidia-cuda-crt==13.4.92 nvidia_cuda_crt-13.4.92-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 731ce3de11df8add8306404417a1edaede225dbe27eb233aed37c8de9d4fe720"
    "nvidia-cuda-runtime==13.4.92 nvidia_cuda_runtime-13.4.92-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 9641f797da20ce1dd8e779b6e96d08cf9ba564cec8e8225458811ee26423f3a5"
    "nvidia-cuda-cccl==13.2.86 nvidia_cuda_cccl-13.2.86-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 35da671cf0cecd3539da214a11bb8e7634366c9e950da9c5feecf6c490a65b20"
)
ROOT="$CACHE/root"
STAMP_TEXT="$(printf '%s\n' "${WHEELS[@]}")"

sha256() { sha256sum "$1" | cut -d' ' -f1; }

CURRENT_TMP=""
cleanup() {
    local status=$?
    if [[ -n "$CURRENT_TMP" ]]; then rm -rf "$CURRENT_TMP"; fi
    return "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# fetch SPEC FILE SHA: makes sure $CACHE/wheels/FILE exists with that checksum.
fetch() {
    local spec="$1" file="$2" want="$3" dest="$CACHE/wheels/$2"
    if [[ -f "$dest" && "$(sha256 "$dest")" == "$want" ]]; then return 0; fi
    local tmp
    tmp="$(mktemp -d "$CACHE/wheels/.download.XXXXXX")"
    CURRENT_TMP="$tmp"
    say "downloading $spec ..."
    if ! "$PYTHON" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check \
        --progress-bar off -d "$tmp" "$spec" >"$tmp/pip.log" 2>&1; then
        cat "$tmp/pip.log" >&2
        die "could not download $spec with pip. Is the package index reachable (network, proxy, PIP_INDEX_URL)?"
    fi
    [[ -f "$tmp/$file" ]] || die "pip downloaded $spec but not the expected file $file"
    local got
    got="$(sha256 "$tmp/$file")"
    [[ "$got" == "$want" ]] ||
        die "checksum mismatch for $file: expected $want, got $got; refusing to use it."
    mv -f "$tmp/$file" "$dest"
    rm -rf "$tmp"
    CURRENT_TMP=""
}

install() {
    mkdir -p "$CACHE/wheels"
    local entry spec file sha files=()
    for entry in "${WHEELS[@]}"; do
        read -r spec file sha <<<"$entry"
        fetch "$spec" "$file" "$sha"
        files+=("$CACHE/wheels/$file")
    done
    local tmp
    tmp="$(mktemp -d "$CACHE/.root.XXXXXX")"
    CURRENT_TMP="$tmp"
    say "unpacking the toolkit into $ROOT ..."
    # zipfile keeps no permission bits: the executables are marked by hand below.
    "$PYTHON" - "$tmp" "${files[@]}" <<'PY' || die "could not unpack the CUDA wheels"
import sys, zipfile
dest, wheels = sys.argv[1], sys.argv[2:]
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.startswith("nvidia/cu13/")]
        if not members:
            sys.exit(f"setup-cuda.sh: error: {wheel} has no nvidia/cu13/ folder")
        z.extractall(dest, members)
PY
    local top="$tmp/nvidia/cu13"
    chmod +x "$top"/bin/* "$top"/nvvm/bin/* 2>/dev/null || true
    ln -sf libcudart.so.13 "$top/lib/libcudart.so"
    ln -sfn lib "$top/lib64"
    local need
    for need in bin/nvcc bin/cudafe++ bin/ptxas bin/fatbinary nvvm/bin/cicc \
        include/cuda_runtime.h include/cuda.h include/cuda_bf16.h include/crt/host_config.h \
        include/cccl/thrust/scan.h; do
        [[ -e "$top/$need" ]] || die "the unpacked wheels lack $need"
    done
    printf '%s\n' "$STAMP_TEXT" >"$top/.complete"
    rm -rf "$ROOT"
    mv "$top" "$ROOT"
    rm -rf "$tmp"
    CURRENT_TMP=""
}

mkdir -p "$CACHE"
if [[ ! -f "$ROOT/.complete" || "$(cat "$ROOT/.complete")" != "$STAMP_TEXT" ]]; then
    install
fi
"$ROOT/bin/nvcc" --version >/dev/null 2>&1 ||
    die "$ROOT/bin/nvcc does not run (remove $CACHE and try again)"

export CUDA_ROOT="$ROOT" CUDA_PATH="$ROOT" CUDA_HOME="$ROOT" NVCC="$ROOT/bin/nvcc"
export PATH="$ROOT/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"

if [[ $# -eq 0 ]]; then
    for var in CUDA_ROOT CUDA_PATH CUDA_HOME NVCC PATH CUDA_COMPUTE_CAP; do
        printf 'export %s=%q\n' "$var" "${!var}"
    done
    exit 0
fi
say "nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP: $*"
trap - EXIT
exec "$@"
