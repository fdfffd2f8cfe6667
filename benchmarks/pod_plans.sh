#!/usr/bin/env bash
# The pod table of docs/pods.md: `k2jax plan` of medium, large and kimi-k2 on v5p slices (no TPU needed;
# hours on a 2-core CPU: kimi-k2's step is the longest compile). Each run writes OUT/NAME.json and
# OUT/NAME.txt; `python benchmarks/plan_table.py OUT` prints the table.
#   bash benchmarks/pod_plans.sh [OUT]          (default runs/pod_plans)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/pod_plans}
mkdir -p "$OUT"
export JAX_PLATFORMS=cpu
run() { name=$1; shift; .venv/bin/k2jax plan "$@" --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1; echo "$name: exit $?"; }

M="--topology v5p:2x2x2 --set mesh.data=1 --set mesh.fsdp=8 --set train.batch_size=8 --set data.seq_len=1024"
run medium_fsdp8 medium $M
run medium_fsdp8_gspmd medium $M --set optim.muon_sharding=gspmd --parts step,update
L32="--topology v5p:2x4x4 --set mesh.data=1 --set mesh.fsdp=4 --set mesh.expert=8 --set train.batch_size=32 --set data.seq_len=4096"
run large_32 large $L32
run large_32_gspmd large $L32 --set optim.muon_sharding=gspmd --parts update
L64="--topology v5p:4x4x4 --set mesh.data=1 --set mesh.fsdp=8 --set mesh.expert=8 --set train.batch_size=64 --set data.seq_len=4096"
run large_64 large $L64 --parts update
run large_64_gspmd large $L64 --set optim.muon_sharding=gspmd --parts update
K="--topology v5p:8x8x8 --set mesh.data=1 --set mesh.fsdp=64 --set mesh.expert=8 --set train.batch_size=512 --set data.seq_len=4096"
run kimi-k2_512_update kimi-k2 $K --parts update
run kimi-k2_512_step kimi-k2 $K --parts step
run kimi-k2_512_gspmd kimi-k2 $K --set optim.muon_sharding=gspmd --parts update
K64="--topology v5p:8x8x8 --set mesh.data=1 --set mesh.fsdp=8 --set mesh.expert=64 --set train.batch_size=512 --set data.seq_len=4096"
run kimi-k2_512_ep64 kimi-k2 $K64 --parts step,update
# K2's expert-heavy layouts: 4M tokens per step, a ragged all-to-all exchange whose receive buffer holds 1.25x
# the balanced inflow (a few minutes each)
EP="--topology v5p:8x8x8 --set mesh.data=1 --set data.seq_len=4096 --set execution.expert_parallel=all_to_all --set execution.expert_buffer_factor=1.25"
run kimi-k2_ep128 kimi-k2 $EP --set mesh.fsdp=4 --set mesh.expert=128 --set train.batch_size=1024 --parts step,update
run kimi-k2_ep64 kimi-k2 $EP --set mesh.fsdp=8 --set mesh.expert=64 --set train.batch_size=1024 --parts step,update
run kimi-k2_ep32 kimi-k2 $EP --set mesh.fsdp=16 --set mesh.expert=32 --set train.batch_size=1024 --parts step,update
run kimi-k2_ep128_2m kimi-k2 $EP --set mesh.fsdp=4 --set mesh.expert=128 --set train.batch_size=512 --parts step
