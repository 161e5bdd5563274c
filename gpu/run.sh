#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with gpu/bundle/ carried there (built
# by gpu/build.sh): the CUDA conformance suite, the CUDA cross-backend checks, the red
# example trained on candle-cuda and on ndarray, and a throughput table. Everything it
# prints also goes to $OUT/gpu-log.txt; summaries and the table land in $OUT.
# Takes ~3-5 min; run it with a timeout of about 8 min (see gpu/README.md).
set -uo pipefail

cd "$(dirname "$0")/.."
out="${OUT:-/tmp/nca-gpu-out}"
mkdir -p "$out"
bundle=/tmp/nca-bin
failures=0
mkdir -p "$bundle"
for packed in gpu/bundle/*.xz; do
    name=$(basename "$packed" .xz)
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$packed" "$bundle/$name" && chmod +x "$bundle/$name"
done

step() { # name, timeout, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%T))"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failures=$((failures + 1))
    return 0
}

main() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    nvcc --version | tail -n 2 || true

    # The binaries link the CUDA 13 libraries by soname; find where this image keeps them
    # (the toolkit's lib64, or NVIDIA's wheels under the Python environment).
    dirs=()
    LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
    for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
        if ! ldconfig -p | grep -q "$lib"; then
            found=$(find /usr/local /opt /usr/lib -name "$lib" 2>/dev/null | head -n 1)
            if [ -n "$found" ]; then dirs+=("$(dirname "$found")"); else echo "missing: $lib"; fi
        fi
    done
    for dir in "${dirs[@]}"; do
        LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    export LD_LIBRARY_PATH
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    if ldd "$bundle/nca-cli" | grep "not found"; then
        echo "run.sh: libraries missing, nothing run"
        exit 1
    fi

    step "conformance suite on CUDA" 240 "$bundle/conformance" --ignored
    step "cross-backend checks on CUDA" 120 "$bundle/cross_backend" --ignored
    step "candle API tests (CUDA device present)" 120 "$bundle/api"

    cli="$bundle/nca-cli"
    step "red.ron on candle-cuda" 120 "$cli" --backend candle-cuda examples/red.ron --out /tmp/red-cuda
    cp /tmp/red-cuda/summary.json "$out/summary-candle-cuda.json" 2>/dev/null
    step "red.ron on ndarray" 120 "$cli" examples/red.ron --out /tmp/red-ndarray
    cp /tmp/red-ndarray/summary.json "$out/summary-ndarray.json" 2>/dev/null
    step "rollout of the CUDA checkpoint on ndarray" 60 "$cli" rollout --backend ndarray \
        --checkpoint /tmp/red-cuda/checkpoint.safetensors --noise 0 --steps 100 --out /tmp/roll

    step "throughput" 240 bash -o pipefail -c "'$cli' bench --backends candle-cuda,ndarray \
        --sizes 32,256,1024 --batches 1,8 --seconds 2 | tee '$out/bench.txt'"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv || true

    echo "run.sh: $failures step(s) failed"
    [ "$failures" -eq 0 ]
}

main 2>&1 | tee "$out/gpu-log.txt"
exit "${PIPESTATUS[0]}"
