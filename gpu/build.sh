#!/usr/bin/env bash
# Builds nca-cli and nca-candle's test programs with CUDA 13 for compute capability 9.0
# (H100/H200; set CUDA_COMPUTE_CAP for another GPU) on a machine that needs no GPU, into
# gpu/bundle/ (git-ignored), ready to be copied to a GPU machine and run there by
# gpu/run.sh. See gpu/README.md.
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

# One cargo invocation builds every CUDA target (benches and examples too, which is what
# .ci/cuda-check relies on to keep them compiling); another feature set would compile
# candle's kernels again (~10 min). Keeps nca-candle's test executables (conformance,
# cross_backend, api) and nca-cli.
cargo test --no-run --all-targets -p nca-candle -p nca-cli -p nca-benches \
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
    # The CLI itself, not the unit-test harness cargo test also builds from main.rs.
    elif target["kind"] == ["bin"] and target["name"] == "nca-cli" and not msg["profile"]["test"]:
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
# A bundle-size guard: the bundle travels with the repository to the GPU machine, and a
# change that suddenly bloats it (another CUDA target, unstripped symbols, a lost xz step)
# should fail here, where it is made, rather than in a copy or upload later.
echo "gpu/build.sh: bundle is $size MiB (limit 56 MiB)"
if [ "$size" -gt 56 ]; then
    echo "gpu/build.sh: bundle over 56 MiB; see the size notes in gpu/README.md" >&2
    exit 1
fi
