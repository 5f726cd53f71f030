#!/usr/bin/env bash
# Issue 13's GPU checks in one go, on a machine with a CUDA device, from the repository's root:
#
#     bash benchmarks/gpu_checks.sh            # logs under $OUT (else ./gpu-out)
#
# 1. tests/test_device.py, whose CPU/GPU agreement tests run only where torch sees a CUDA device;
# 2. benchmarks/bench_scale.py --part 1 --device cuda: 8 experts shaped like CLIP ViT-B/32, TIES and SA-Merging
#    (T = 10) on the CPU and on the GPU side by side, and how far the GPU outputs are from the CPU ones;
# 3. the pipeline's prune stage (`python -m samerge stage prune`) with the default `device: auto` on those 8 experts,
#    laid out as the acquire stage lays out its output: where it computed is in work/prune/METHOD/summary.json.
#
# samerge runs from this checkout (PYTHONPATH), under $PYTHON (default python3), which needs torch with CUDA and
# samerge's dependencies (pyproject.toml). Each step has its own time limit, and its log is written as it runs.
set -uo pipefail
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK=$(mktemp -d /tmp/samerge-gpu-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
step() { echo "=== $* ($(date +%T))"; }

step environment
{ nvidia-smi -L; nproc; free -g | head -2
  "$PY" -c "import torch, numba, numpy, samerge; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'numba', numba.__version__, 'numpy', numpy.__version__)"; } 2>&1 | tee "$OUT/env.log"

step "tests/test_device.py"
timeout -k 5 "${TESTS_LIMIT:-120}" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_device.py 2>&1 \
  | tee "$OUT/tests.log"

step "bench_scale part 1 on cpu and cuda"
timeout -k 5 "${BENCH_LIMIT:-300}" "$PY" benchmarks/bench_scale.py --part 1 --device cuda --cache "$WORK/cache" \
  ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"

step "prune stage, device: auto"
inputs="$WORK/cache/clip-vit-b32"
if [ -f "$inputs/base.safetensors" ]; then
  acq="$WORK/pipe/work/acquire"
  mkdir -p "$acq/experts"
  ln -s "$inputs/base.safetensors" "$acq/base.safetensors"
  for e in "$inputs"/expert_*.safetensors; do
    n=$(basename "$e" .safetensors)
    mkdir "$acq/experts/$n" && ln -s "$e" "$acq/experts/$n/expert.safetensors"
  done
  "$PY" -c "import json, pathlib, sys; a = pathlib.Path(sys.argv[1]); json.dump({'suite': 'clip-vit-b32-shaped',
'experts': [{'name': d.name} for d in sorted((a / 'experts').iterdir())]}, open(a / 'manifest.json', 'w'))" "$acq"
  for m in ties sa_merging; do
    timeout -k 5 60 "$PY" -m samerge stage prune --workdir "$WORK/pipe" --params params.yaml --method "$m" --quiet 2>&1 \
      | tee -a "$OUT/prune.log"
    cat "$WORK/pipe/work/prune/$m/summary.json" 2>&1 | tee -a "$OUT/prune.log"; echo
  done
else
  echo "no inputs (the benchmark did not write them)" | tee "$OUT/prune.log"
fi
step done
