#!/usr/bin/env bash
# llama.cpp beside our engine at batches of 1..16 on identical GGUF files: the peer for the decode
# batches the tensor-core kernel serves (kernels/qmma.py). llama-bench times one sequence only;
# llama.cpp's `llama-batched-bench` decodes B sequences together (-npl), as our batches do.
#   bash bench/llamacpp_batched.sh [MODEL] [QUANTS]   # on the GPU machine, .peers carried
#   GPU=0 NPL=1,2 bash bench/llamacpp_batched.sh 1b Q4_K_M   # a check of the script on a CPU
# MODEL: 8b (default) or 1b (Llama shapes of random weights, written in f16 by
# ../shared/peers/llamacpp/mkgguf.py, which must be copied into .peers/llamacpp); QUANTS: comma
# list of llama-quantize types (default Q4_K_M,Q5_K_M,Q8_0,Q4_0). Needs the pruned llama.cpp tree of
# ../shared/peers/llamacpp/prepare.sh at .peers/llama.cpp; it adds batched-bench back from the
# same sdist (llama-cpp-python 0.3.36 on PyPI) when the tree lacks it. Per file: llama.cpp with
# 128 prompt tokens and 128 generated per sequence (flash attention, all layers on the GPU),
# then ours on the same file (`bench/quant_decode.py --gguf FILE`, graphs, prompt 128, the same
# batches; with GPU=0 its --smoke, whose numbers mean nothing). Prints one table: tok/s total and
# tok/s per sequence of both.
set -euo pipefail
MODEL=${1:-8b}
QUANTS=${2:-Q4_K_M,Q5_K_M,Q8_0,Q4_0}
NPL=${NPL:-1,2,4,8,16}
GPU=${GPU:-1}
SRC=.peers/llama.cpp
BUILD=${BUILD:-/tmp/lcpp-batched}
W=${W:-/tmp/lw}
OUTDIR=${OUT:-/tmp}
mkdir -p "$W"
[ -d "$SRC" ] || { echo "no $SRC: run ../shared/peers/llamacpp/prepare.sh $SRC" >&2; exit 1; }
[ -f .peers/llamacpp/mkgguf.py ] \
    || { echo "no .peers/llamacpp/mkgguf.py: copy ../shared/peers/llamacpp there" >&2; exit 1; }
if [ ! -d "$SRC/tools/batched-bench" ]; then  # the pruned tree: batched-bench from the same sdist
    tmp=$(mktemp -d)
    pip download -q --no-deps --no-binary :all: -d "$tmp" llama-cpp-python==0.3.36
    tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp" \
        llama_cpp_python-0.3.36/vendor/llama.cpp/tools/batched-bench
    mv "$tmp"/llama_cpp_python-0.3.36/vendor/llama.cpp/tools/batched-bench "$SRC/tools/"
    rm -rf "$tmp"
fi
grep -q batched-bench "$SRC/tools/CMakeLists.txt" \
    || echo 'add_subdirectory(batched-bench)' >> "$SRC/tools/CMakeLists.txt"
if [ ! -x "$BUILD/bin/llama-batched-bench" ] || [ ! -x "$BUILD/bin/llama-quantize" ]; then
    if [ "$GPU" = 1 ]; then
        ARCH="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF
              -DGGML_CUDA_FA_ALL_QUANTS=OFF"
    else  # AVX-512 without -march=native: see bench/llamacpp_cpu.sh (NATIVE=0) for why
        ARCH="-DGGML_CUDA=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON
              -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON
              -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
    fi
    # shellcheck disable=SC2086
    cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release $ARCH -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF > "$W/cmake-batched.log" 2>&1 \
        || { tail -30 "$W/cmake-batched.log"; exit 1; }
    cmake --build "$BUILD" -j "$(nproc)" --target llama-batched-bench llama-quantize \
        > "$W/build-batched.log" 2>&1 || { tail -40 "$W/build-batched.log"; exit 1; }
fi
[ -f "$W/$MODEL-f16.gguf" ] \
    || PYTHONPATH="$SRC/gguf-py" python3 .peers/llamacpp/mkgguf.py "$W" "$MODEL"
NGL=0; [ "$GPU" = 1 ] && NGL=99
MAXB=$(tr , '\n' <<<"$NPL" | sort -n | tail -1)
rows="$OUTDIR/batched_rows.txt"; : > "$rows"
for q in ${QUANTS//,/ }; do
    f="$W/$MODEL-$q.gguf"
    [ -f "$f" ] || "$BUILD/bin/llama-quantize" "$W/$MODEL-f16.gguf" "$f" "$q" "$(nproc)" \
        > "$W/quantize.log" 2>&1 || { tail -5 "$W/quantize.log"; exit 1; }
    # -c: every sequence's 128 + 128 tokens at the largest batch
    "$BUILD/bin/llama-batched-bench" -m "$f" -c $((256 * MAXB)) -b 2048 -ub 512 -npp 128 -ntg 128 \
        -npl "$NPL" -ngl "$NGL" -fa on > "$W/batched-$q.log" 2>&1 \
        || { tail -20 "$W/batched-$q.log"; exit 1; }
    # its table: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    awk -v q="$q" -F'|' 'NF >= 11 && $4 + 0 > 0 { printf "%s llama.cpp %d %.1f\n", q, $4, $9 }' \
        "$W/batched-$q.log" >> "$rows"
    SMOKE=""; [ "$GPU" = 1 ] || SMOKE=--smoke  # on a CPU: the script's check, numbers aside
    python3 bench/quant_decode.py --gguf "$f" --batches "$NPL" --prompt-len 128 $SMOKE \
        > "$W/ours-$q.log" 2>&1 || { tail -20 "$W/ours-$q.log"; exit 1; }
    # its rows: | file | weights | batch | ms/step | tok/s/user | tok/s total | ...
    awk -v q="$q" -F'|' '$2 ~ /gguf/ && $4 + 0 > 0 { printf "%s ours %d %s\n", q, $4, $7 }' \
        "$W/ours-$q.log" | tr -d , >> "$rows"
done
python3 - "$rows" <<'EOF'
import sys
from collections import defaultdict
t = defaultdict(dict)
for line in open(sys.argv[1]):
    q, who, b, tps = line.split()
    t[(q, int(b))][who] = float(tps)
print("| file | batch | llama.cpp tok/s total (/seq) | ours tok/s total (/seq) "
      "| ours / llama.cpp |")
print("|---|---|---|---|---|")
for (q, b), v in sorted(t.items()):
    lc, us = v.get("llama.cpp"), v.get("ours")
    cell = lambda x: f"{x:,.1f} ({x / b:,.1f})" if x else "-"
    print(f"| {q} | {b} | {cell(lc)} | {cell(us)} | {f'{us / lc:.2f}x' if lc and us else '-'} |")
EOF
