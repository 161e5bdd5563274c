#!/usr/bin/env bash
# Builds the CUDA test and CLI binaries for the GPU machine (CUDA 13, H200 = sm_90) on a
# machine without a GPU, into gpu/bundle/ (git-ignored), ready to be carried there and run
# by gpu/run.sh. See gpu/README.md.
#
# Cost on 2 cores: ~20 min the first time (candle's CUDA kernels), then seconds.
set -euo pipefail

cd "$(dirname "$0")/.."
home=$(gpu/toolkit.sh --link)
export CUDA_HOME="$home" PATH="$home/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda13}"

bundle=gpu/bundle
rm -rf "$bundle"
mkdir -p "$bundle"

# The test executables, named after their test file (conformance, cross_backend, api).
cargo test -p nca-candle --features cuda --no-run --message-format=json \
    | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
            and msg["profile"]["test"] and msg["target"]["kind"] == ["test"]:
        shutil.copy(msg["executable"], sys.argv[1] + "/" + msg["target"]["name"])
' "$bundle"
cargo build -p nca-cli --features candle-cuda
cp "$CARGO_TARGET_DIR/debug/nca-cli" "$bundle/nca-cli"

strip "$bundle"/*
# ~50 MiB each stripped, mostly candle's kernels (PTX and cubins); xz makes that ~6 MiB.
xz -T0 -6 "$bundle"/*
ls -l "$bundle"
size=$(du -sm "$bundle" | cut -f1)
echo "gpu/build.sh: bundle is $size MiB (the device tool carries 64 MiB in all)"
if [ "$size" -gt 56 ]; then
    echo "gpu/build.sh: too big to carry with the working tree" >&2
    exit 1
fi
