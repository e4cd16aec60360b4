#!/usr/bin/env bash
# The GPU checks of one session on a lent single-GPU machine (one H200 here), in two phases so
# that each fits a short lease (15 device-minutes per task, a machine start included: run one
# phase per lease, and mind the time limits below). Measured on an H200 (2026-12-04): bf16
# matmul peak + paper prior step 44 s, guided sampler of the 1.5 B decoder 108 s (46 s of it
# compile), that decoder's train step 167 s of compile alone. The machine has python3 with jax[cuda], flax, optax, orbax and
# torch; what it lacks (tensorflow-datasets and its dependencies, diffusers, dall-e) travels as
# wheels in .whl/ (see the device notes in the closing note of that session). Results go to $OUT.
#
#   bash benchmarks/gpu_session.sh bench     # bench_gpu (bf16 MFU, sampler) + bench_convert
#   bash benchmarks/gpu_session.sh decoder   # the shapes chain up to the decoder, 10x steps
set -uo pipefail
phase=${1:?bench or decoder}
OUT=${OUT:-/tmp/out}
DEC_STEPS=${DEC_STEPS:-20000}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# configs written on the development machine name /work/main: make that path this checkout
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
nvidia-smi -L
python3 -c "import jax, flax, orbax.checkpoint as o; print('jax', jax.__version__, jax.devices(),
'flax', flax.__version__, 'orbax', o.__version__)"

case $phase in
bench)
  # each case rewrites $OUT/bench_gpu.md when it finishes (prior, sampler, decoder step)
  timeout 420 python3 benchmarks/bench_gpu.py --out "$OUT/bench_gpu.md" 2>&1 | tail -30
  timeout 150 python3 benchmarks/bench_convert.py --device cuda \
    --out "$OUT/bench_convert_gpu.md" 2>&1 | tail -20
  ;;
decoder)
  # data, tokenizer, CLIP, prior and the decoder at DEC_STEPS steps (the demo's 2000 × 10),
  # every other setting as the demo's; then the per-stage judge rows of diagnose_chain.py
  W=/tmp/gpu_demo
  timeout 420 python3 -m unclip_jax.commands.cli demo --workdir $W --until decoder \
    --set decoder:train.steps=$DEC_STEPS --set decoder:train.ckpt_every=$DEC_STEPS \
    --set decoder:train.log_every=500 --set decoder:data.num_workers=8 2>&1 \
    | grep -v "it/s" | tail -40
  cp $W/decoder/metrics.jsonl "$OUT/decoder_metrics.jsonl" 2>/dev/null
  cp $W/report.json "$OUT/demo_report.json" 2>/dev/null
  cp $W/stage_times.json "$OUT/stage_times.json" 2>/dev/null
  timeout 240 python3 experiments/shapes/diagnose_chain.py --workdir $W \
    --out "$OUT/diagnose.json" 2>&1 | tail -12
  ;;
esac
