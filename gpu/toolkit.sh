#!/usr/bin/env bash
# Assembles a CUDA 13.0 toolkit from NVIDIA's PyPI wheels, without root and without a GPU,
# and prints its path (use it as CUDA_HOME, with $CUDA_HOME/bin first on PATH).
#
#   gpu/toolkit.sh            compiler only: nvcc, cicc, headers (~100 MB download);
#                             enough for `cargo check --features cuda`
#   gpu/toolkit.sh --link     also the libraries candle links against (cuBLAS, cuRAND,
#                             NVRTC, cudart; ~600 MB) and a link-time stub of libcuda.so,
#                             enough to build CUDA binaries for another machine
#
# Why 13.0 exactly: the GPU machine's driver (580) runs PTX up to ISA 9.0, which is what
# nvcc 13.0 writes; a newer nvcc writes PTX that driver refuses. Why a libcuda stub:
# libcuda.so belongs to the driver, not the toolkit, and the one a machine without a GPU
# may have is older than the CUDA 13 entry points cudarc links; the stub (every CUresult
# function of cuda.h, each returning an error) only satisfies the linker, and the real
# driver library is loaded at run time.
#
# Exit status 2: the wheels could not be downloaded (no package index reachable).
# The toolkit lands in target/cuda-13.0 (override with NCA_CUDA_HOME); reruns reuse it.
set -euo pipefail

cd "$(dirname "$0")/.."
home="${NCA_CUDA_HOME:-$PWD/target/cuda-13.0}"
link=false
[ "${1:-}" = "--link" ] && link=true

compiler=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96)
libraries=(nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88)

install() { # marker, wheels...
    local marker="$home/.$1"
    shift
    [ -f "$marker" ] && return 0
    local wheels="$home.wheels"
    mkdir -p "$wheels" "$home"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" "$@" >&2 || exit 2
    local spec
    for spec in "$@"; do
        local name="${spec%%==*}" version="${spec##*==}"
        # Every wheel unpacks into nvidia/cu13/{bin,include,lib,nvvm}: one tree.
        python3 -m zipfile -e "$wheels/${name//-/_}-$version"-*.whl "$home.unpacked" >&2
    done
    cp -a "$home.unpacked/nvidia/cu13/." "$home/"
    rm -rf "$home.unpacked" "$wheels"
    chmod +x "$home"/bin/* "$home"/nvvm/bin/*
    touch "$marker"
}

install compiler "${compiler[@]}"

if $link; then
    install libraries "${libraries[@]}"
    # The linker looks for the unversioned names.
    for lib in cublas cublasLt curand nvrtc cudart; do
        versioned=$(cd "$home/lib" && ls "lib$lib.so."* | grep -v alt | head -n 1)
        ln -sf "$versioned" "$home/lib/lib$lib.so"
    done
    if [ ! -f "$home/lib/stubs/libcuda.so" ]; then
        mkdir -p "$home/lib/stubs"
        # After preprocessing, the names are the real exported symbols (cuMemAlloc_v2 …).
        echo '#include <cuda.h>' | cc -E -P -I"$home/include" - | tr '\n' ' ' \
            | grep -oE 'CUresult +cu[A-Za-z0-9_]+ *\(' | sed -E 's/CUresult +//; s/ *\(//' \
            | sort -u | awk '{ print "int " $1 "(void) { return 999; }" }' \
            > "$home/lib/stubs/libcuda_stub.c"
        cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib/stubs/libcuda.so" \
            "$home/lib/stubs/libcuda_stub.c"
    fi
fi

"$home/bin/nvcc" --version | grep -q "release 13.0" || {
    echo "toolkit.sh: $home/bin/nvcc is not CUDA 13.0" >&2
    exit 1
}
echo "$home"
