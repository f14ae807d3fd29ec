#!/bin/bash
# Issue 16 on one H200, in one device command (≤ 10 min): what the one-pass activation kernel buys.
#   1. bench_gemm.py quick: per Linear (d16 qkv, d30 fc1, d30 fc2 × W8A8, W4A6, W4A4), XLA's activation codes
#      against act_kernel.py's, the whole Linear with each, and bf16 beside them (same process, same GPU).
#   2. Whole sampling calls, batch 64, scanned blocks: our bf16 and the integer model with the activation and
#      attention kernels (d16 bf16 + W4A6 shift-and-sum; d30 bf16 + W8A8 when STEPS includes d30 — its integer
#      compile is ~200 s; d16attn: W4A6 again with XLA's attention, the attention kernel's share).
#   3. With BREAKDOWN=1: one more d16 W4A6 call profiled with command buffers off (time per part).
# Outputs land in $OUT (gemm.json, rows_*.json, logs); each step has its own timeout so the others come back.
#   bash benchmarks/integer/device_rows.sh            # steps gemm,d16
#   STEPS=gemm,d16,d30 BREAKDOWN=1 bash benchmarks/integer/device_rows.sh
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
STEPS=${STEPS:-gemm,d16}
T0=$(date +%s)
has() { [[ ",$STEPS," == *",$1,"* ]]; }
if has gemm; then
    timeout 200 python benchmarks/integer/bench_gemm.py $OUT/gemm.json quick 2>&1 | grep --line-buffered -v "^W\|^I" \
        | tail -n 40 > $OUT/gemm.log
fi
bench() {   # NAME TIMEOUT ROWS [more flags]
    local name=$1 limit=$2 rows=$3; shift 3
    timeout $limit python -m experiments.benchmark --presets "" --quant_presets "" --batches 64 --nobreakdown \
        --int_rows $rows --out $OUT/rows_$name.json "$@" 2>&1 | grep --line-buffered -v "^W\|^I" \
        | tee $OUT/rows_$name.log
}
K=(--int_act_kernel=pallas --int_attn_kernel=pallas)
has d16 && bench d16 240 d16:fp,d16:w4a6sas "${K[@]}"
has d16attn && bench d16attn 200 d16:w4a6sas --int_act_kernel=pallas       # the attention kernel's share
has d30 && bench d30 330 d30:fp,d30:w8a8 "${K[@]}"
if [ "${BREAKDOWN:-0}" = 1 ]; then
    XLA_FLAGS=--xla_gpu_enable_command_buffer= bench d16_breakdown 200 d16:w4a6sas --breakdown "${K[@]}"
fi
echo "total $(( $(date +%s) - T0 )) s" | tee -a $OUT/gemm.log
