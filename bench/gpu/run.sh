#!/usr/bin/env bash
# One prepared GPU benchmark run for an H100 / H200, finished in under 10 minutes.
#
#   bash bench/gpu/run.sh                 # SD 1.5 shapes, 512x512, 50 DDIM steps, batches 1 4 8 16
#   bash bench/gpu/run.sh --tiny --device cpu   # the CPU check of the same script (leaves the docs alone)
#
# It builds random-weight SD 1.5 models on the GPU (no download), measures diffusers
# fp16 eager and our pipeline per backend, checks every backend against eager (exit 1
# on a mismatch), stops before a 9-minute deadline (skipped configs are listed) and
# writes the table into docs/benchmarks.md between the gpu-bench markers, plus
# gpu_bench.md / gpu_bench.json / gpu_bench.log / nvidia-smi.txt into $OUT (or
# bench/gpu/out), because on a lent machine only $OUT comes back. Bring the table home with
#   .venv/bin/python bench/gpu/gpu_bench.py --apply <files_at>/gpu_bench.md
#
# Python: $PYTHON, else .venv/bin/python when it sees a GPU, else python3.
# diffusers is not in the GPU image and that machine has no network: carry its wheel.
# Here, once:  bash bench/gpu/fetch_wheels.sh   (writes .whl/, which git must ignore:
#              echo /.whl/ >> .git/info/exclude), then run with carry [".whl"].
set -uo pipefail
cd "$(dirname "$0")/../.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
fi
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c 'import diffusers' 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/ldm-serve-site .whl/*.whl \
        && export PYTHONPATH="/tmp/ldm-serve-site${PYTHONPATH:+:$PYTHONPATH}"
fi

OUT_DIR="${OUT:-bench/gpu/out}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
# inductor / Triton caches of this run stay in one place (kept between runs on the same machine)
export LDM_BENCH_CACHE="${LDM_BENCH_CACHE:-/tmp/ldm-serve-bench-cache}"
nvidia-smi -q > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
"$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'

# the docs table is only rewritten by real runs (a --tiny check writes to $OUT_DIR, or to its own --out)
DOCS=(--out docs/benchmarks.md)
case " $* " in *" --tiny "*) DOCS=() ;; esac
timeout --signal=TERM 590 "$PY" bench/gpu/gpu_bench.py "${DOCS[@]}" --out-dir "$OUT_DIR" \
    --cache-dir "$LDM_BENCH_CACHE" "$@" 2>&1 | tee "$OUT_DIR/gpu_bench.log"
rc=${PIPESTATUS[0]}
cp docs/benchmarks.md "$OUT_DIR/benchmarks.md" 2>/dev/null || true
[ "$rc" -eq 124 ] && echo "gpu_bench.py hit the 590 s timeout; partial results are in $OUT_DIR" >&2
exit "$rc"
