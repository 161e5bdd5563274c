#!/usr/bin/env bash
# Builds the CUDA test and CLI binaries for the GPU machine (CUDA 13, H200 = sm_90) on a
# machine without a GPU, into gpu/bundle/ (git-ignored), ready to be carried there and run
# by gpu/run.sh. See gpu/README.md.
#
# Cost on 2 cores: ~15 min the first time (mostly candle's CUDA kernels), then 1-4 min.
set -euo pipefail

cd "$(dirname "$0")/.."
home=$(gpu/toolkit.sh --link)
export CUDA_HOME="$home" PATH="$home/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda13}"

bundle=gpu/bundle
rm -rf "$bundle"
mkdir -p "$bundle"

# One cargo invocation for every CUDA target, with the same packages and features as
# .ci/cuda-check: different feature sets would compile candle's kernels again (~10 min).
# Keeps nca-candle's test executables (conformance, cross_backend, api) and nca-cli.
cargo test --no-run -p nca-candle -p nca-cli -p nca-benches \
    --features nca-candle/cuda,nca-cli/candle-cuda,nca-benches/cuda --message-format=json-render-diagnostics \
    | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    target = msg["target"]
    if target["kind"] == ["test"] and "nca-candle" in msg["package_id"]:
        shutil.copy(msg["executable"], sys.argv[1] + "/" + target["name"])
    elif target["kind"] == ["bin"] and target["name"] == "nca-cli":
        shutil.copy(msg["executable"], sys.argv[1] + "/nca-cli")
' "$bundle"
for name in api conformance cross_backend nca-cli; do
    [ -f "$bundle/$name" ] || { echo "gpu/build.sh: no $name was built" >&2; exit 1; }
done

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
