#!/usr/bin/env bash
# The GPU measurements behind the accelerator goals (docs/throughput.md), as separate stages of under
# 10 minutes each; whole logs go to $OUT, the end of each is printed.
#
#   bash benchmarks/gpu_session.sh check       # versions; kernel tests on the real GPU (Triton flash, ragged dot)
#   bash benchmarks/gpu_session.sh attention   # plain vs flash tiles vs cuDNN, fwd+bwd, max-logit agreement
#   bash benchmarks/gpu_session.sh dense       # k2jax bench: base-dense, MuonClip vs Muon vs AdamW, MFU
#   bash benchmarks/gpu_session.sh moe         # the same for the base MoE (+ a profile of one step each)
#   bash benchmarks/gpu_session.sh kernels     # base MoE: flash vs plain attention, ragged_dot vs tiled
#   bash benchmarks/gpu_session.sh ns          # base MoE, MuonClip: Newton-Schulz in float32 vs bfloat16
#
# It uses the device image's own Python (its JAX, Flax and optax, which may be newer than
# requirements.lock: `check` prints them) with this tree on PYTHONPATH; nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/k2jax-gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
K2JAX=("$PY" -m k2jax.cli)
BENCH=experiments/bench_base.yaml

run() {  # run NAME CMD...: keep the whole log, print its last lines
    local name=$1; shift
    echo "== $name: $*"
    timeout 540 "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? (log: $OUT/$name.log)"
    tail -n 15 "$OUT/$name.log"
}

case "${1:-}" in
  check)
    run versions "$PY" -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"
    run kernel_tests "$PY" -m pytest -q -p no:cacheprovider tests/test_flash_attention.py tests/test_attention.py tests/test_moe.py
    ;;
  attention)
    run attention_mla "$PY" benchmarks/attention.py
    run attention_head128 "$PY" benchmarks/attention.py --qk-dim 128 --v-dim 128
    ;;
  dense)
    run bench_dense "${K2JAX[@]}" bench "$BENCH" --set model.preset=base-dense --steps 5 --warmup 1
    ;;
  moe)
    run bench_moe "${K2JAX[@]}" bench "$BENCH" --steps 5 --warmup 1 --profile "$OUT/profile_moe"
    ;;
  kernels)
    run compare_attention "${K2JAX[@]}" bench "$BENCH" --set optim.name=adamw --steps 3 --warmup 1 \
        --compare execution.attention_impl=flash,plain
    run compare_grouped "${K2JAX[@]}" bench "$BENCH" --set optim.name=adamw --steps 3 --warmup 1 \
        --compare execution.grouped_matmul=ragged_dot,tiled
    # JAX's own Pallas-Triton lowering of ragged_dot (off by default): compare its step time with the line above
    JAX_RAGGED_DOT_USE_GPU_PALLAS_TRITON_LOWERING=1 run ragged_dot_triton "${K2JAX[@]}" bench "$BENCH" \
        --set optim.name=adamw --steps 3 --warmup 1 --compare execution.grouped_matmul=ragged_dot
    ;;
  ns)
    run compare_ns_dtype "${K2JAX[@]}" bench "$BENCH" --steps 3 --warmup 1 --compare optim.ns_dtype=float32,bfloat16
    ;;
  *)
    sed -n 2,13p "$0"; exit 2 ;;
esac
