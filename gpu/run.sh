#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with gpu/bundle/ there (built by
# gpu/build.sh): the CUDA conformance suite (default picture model and the plain model's
# golden files), the CUDA cross-backend checks, the red example (plain model) and the cat
# picture (default picture model: position inputs L = 6, MLP M = 128) trained on
# candle-cuda and on ndarray, and a throughput table of the picture model. Everything it
# prints also goes to $OUT/gpu-log.txt; summaries and the table land in $OUT.
# Takes ~4-6 min; give it a timeout of about 9 min (see gpu/README.md).
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
    step "red.ron (plain model) on candle-cuda" 120 "$cli" --backend candle-cuda examples/red.ron --out /tmp/red-cuda
    cp /tmp/red-cuda/summary.json "$out/summary-red-candle-cuda.json" 2>/dev/null
    step "red.ron (plain model) on ndarray" 120 "$cli" examples/red.ron --out /tmp/red-ndarray
    cp /tmp/red-ndarray/summary.json "$out/summary-red-ndarray.json" 2>/dev/null
    step "rollout of the CUDA red checkpoint on ndarray" 60 "$cli" rollout --backend ndarray \
        --checkpoint /tmp/red-cuda/checkpoint.safetensors --noise 0 --steps 100 --out /tmp/roll

    # The picture model: examples/cat.ron's defaults (L = 6, M = 128, clip 1.0) with fewer
    # steps so that the whole script fits its time; written here because the run file
    # names its picture relative to itself.
    picture=/tmp/nca-cat-gpu.ron
    cat > "$picture" <<RON
#![enable(implicit_some)]
(
    grid: (height: 32, width: 32),
    training: (steps: 2000, seed: 0),
    target: Image(path: "$PWD/examples/cat.png"),
    output: (snapshot_every: 500, checkpoint_every: 1000, scale: 8),
    evaluation: (steps: 100, seeds: 3, every: 1000),
)
RON
    step "cat (picture model) on candle-cuda" 180 "$cli" --backend candle-cuda "$picture" --out /tmp/cat-cuda
    cp /tmp/cat-cuda/summary.json "$out/summary-cat-candle-cuda.json" 2>/dev/null
    step "cat (picture model) on ndarray" 180 "$cli" "$picture" --out /tmp/cat-ndarray
    cp /tmp/cat-ndarray/summary.json "$out/summary-cat-ndarray.json" 2>/dev/null
    step "rollout of the CUDA cat checkpoint on ndarray" 60 "$cli" rollout --backend ndarray \
        --checkpoint /tmp/cat-cuda/checkpoint.safetensors --noise 0 --steps 100 --out /tmp/roll-cat

    # Throughput of the picture model (bench's default model, named by --config); ndarray
    # stops at 256² because a 1024² batch of 8 would take minutes per step on the CPU.
    step "throughput on candle-cuda" 240 bash -o pipefail -c "'$cli' bench --backends candle-cuda \
        --config '$picture' --sizes 32,256,1024 --batches 1,8 --seconds 2 | tee '$out/bench-candle-cuda.txt'"
    step "throughput on ndarray" 120 bash -o pipefail -c "'$cli' bench --backends ndarray \
        --config '$picture' --sizes 32,256 --batches 1,8 --seconds 2 | tee '$out/bench-ndarray.txt'"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv || true

    echo "run.sh: $failures step(s) failed"
    [ "$failures" -eq 0 ]
}

main 2>&1 | tee "$out/gpu-log.txt"
exit "${PIPESTATUS[0]}"
