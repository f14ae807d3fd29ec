#!/bin/bash
# Issue 16 on one H200: the rows of BENCHMARKS.md's integer-execution table, in device commands of ≤ 10 minutes.
# STEPS picks, in this order (each with its own timeout, so the others come back; outputs in $OUT):
#   official  the official VAR's FP sampling, d30 and d16 at batch 64 (official.json; REF_DIR=.refs, carried)
#   check     the Pallas kernels compiled on this GPU against the XLA math (kernel_check.json); a kernel that fails
#             is left out of the rows below (they fall back to XLA, and the rows record it)
#   d16       our bf16 and W4A6 shift-and-sum integer, d16 batch 64      d16attn  W4A6 again, XLA's attention
#   d16xla    W4A6 again with XLA's activation codes and attention (the activation kernel's share, same lease)
#   dequant   W4A6 (d16, beside the simulation) from integer codes through kernel="dequant": ŵ made in the call,
#             fake-quantized inputs, 16-bit GEMMs (the simulation's arithmetic, the codes' memory)
#   dequant30 W8A8 at d30 the same way (its compile alone is minutes: a step of its own)
#   d30       our bf16 and W8A8 integer, d30 batch 64 (integer compile ~200 s)
#   d30w4     W4A6 shift-and-sum integer at d30 batch 64 (the W4 peak at d30)
#   breakdown one more d16 W4A6 call profiled with command buffers off (time per part)
#   lowbits   W4A8 and W4A4 integer, d16 batch 64      w8d16  W8A8 integer at d16 beside bf16 (the W8 peak)
#   latency   bf16 and W4A6 at d16 batch 8 and 1
#   parts     call_parts.py: every Linear and attention of a d16 W4A6 and a d30 W8A8 call timed alone at its
#             shapes, bf16 beside (the breakdown without a profiler; the rest from the d16/d30 rows of this run;
#             PARTS=d16:64:w4a6sas picks the calls; CALLS=rows.json,... gives whole-call rows of an earlier command
#             of the lease, copied into the tree, when this one has none)
#   gemm      bench_gemm.py quick: one Linear per config, XLA's codes vs the kernel's, bf16 beside
#   intsim    the research model's W8A8/W4A6 baselines evaluated in integer execution (results_part.sh; compare
#             with the simulated parts by int_vs_sim.py)
# Every row: scanned blocks, random weights, CFG 1.5, top-k 900, top-p 0.96, median of 5 after a warm-up.
#   STEPS=official,check,d16,d16attn bash benchmarks/integer/device_rows.sh
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
STEPS=${STEPS:-official,check,d16}
T0=$(date +%s)
has() { [[ ",$STEPS," == *",$1,"* ]]; }
quiet() { grep --line-buffered -v "^W\|^I"; }
if has official; then      # fp16 as the official code runs; where its GEMMs fail here, bf16 (official_fp.py)
    for env in "AUTOCAST=float16" "AUTOCAST=bfloat16"; do
        env REF_DIR=${REF_DIR:-.refs} $env timeout 150 python3 benchmarks/integer/official_fp.py $OUT/official.json \
            d30:64,d16:64 > $OUT/official_${env#AUTOCAST=}.log 2>&1 && break
    done
    tail -n 2 $OUT/official_*.log
fi
ACT=pallas ATTN=pallas
K_FILE=/tmp/kernel_check.json
if has check; then
    timeout 150 python benchmarks/integer/kernel_check.py $K_FILE 2>&1 | quiet | tail -n 40 > $OUT/kernel_check.log
    cp $K_FILE $OUT/ 2>/dev/null; tail -n 1 $OUT/kernel_check.log
fi
if [ -f $K_FILE ]; then
    grep -q '"act_ok": true' $K_FILE || ACT=xla
    grep -q '"attn_ok": true' $K_FILE || ATTN=xla
else
    echo "no kernel check on this machine: the rows use the kernels unchecked"
fi
K=(--int_act_kernel=$ACT --int_attn_kernel=$ATTN)
bench() {   # NAME TIMEOUT ROWS [more flags]
    local name=$1 limit=$2 rows=$3; shift 3
    timeout $limit python -m experiments.benchmark --presets "" --quant_presets "" --batches 64 --nobreakdown \
        --int_rows $rows --out $OUT/rows_$name.json "$@" 2>&1 | quiet | tee $OUT/rows_$name.log
}
has d16 && bench d16 240 d16:fp,d16:w4a6sas "${K[@]}"
has d16attn && bench d16attn 200 d16:w4a6sas --int_act_kernel=$ACT          # the attention kernel's share
has d16xla && bench d16xla 200 d16:w4a6sas --int_act_kernel=xla --int_attn_kernel=xla
has dequant && bench dequant 240 d16:w4a6sas,d16:w4a6sas:simulate --int_kernel=dequant    # XLA attention
has dequant30 && bench dequant30 400 d30:w8a8 --int_kernel=dequant
has d30 && bench d30 450 d30:fp,d30:w8a8 "${K[@]}"
has d30w4 && bench d30w4 450 d30:w4a6sas "${K[@]}"
if has breakdown; then
    XLA_FLAGS=--xla_gpu_enable_command_buffer= bench breakdown 200 d16:w4a6sas --breakdown "${K[@]}"
fi
has lowbits && bench lowbits 240 d16:w4a8,d16:w4a4 "${K[@]}"
has w8d16 && bench w8d16 300 d16:fp,d16:w8a8 "${K[@]}"
has latency && bench latency 300 d16:fp,d16:w4a6sas --batches 8,1 "${K[@]}"
if has parts; then
    CALLS=${CALLS:-$(ls $OUT/rows_d16.json $OUT/rows_d30.json 2>/dev/null | paste -sd, -)}
    timeout 300 python benchmarks/integer/call_parts.py $OUT/call_parts.json ${PARTS:-d16:64:w4a6sas,d30:64:w8a8} \
        $ACT $ATTN \
        --calls=$CALLS 2>&1 | quiet | tail -n 20 > $OUT/call_parts.log
fi
if has gemm; then
    timeout 200 python benchmarks/integer/bench_gemm.py $OUT/gemm.json quick 2>&1 | quiet | tail -n 40 > $OUT/gemm.log
fi
if has intsim; then
    PART_TIMEOUT=${INTSIM_TIMEOUT:-400} bash benchmarks/research/results_part.sh int_sim --presets=w8a8,w4a6 \
        --methods=baseline --execution=int > /dev/null
fi
echo "total $(( $(date +%s) - T0 )) s" | tee -a $OUT/steps.log
# the device returns at most 8 files: past that, everything travels as one bundle
if [ $(find $OUT -maxdepth 1 -type f | wc -l) -gt 8 ]; then
    tar -C $OUT -czf /tmp/device_rows.tgz --exclude=device_rows.tgz . && find $OUT -mindepth 1 -delete \
        && mv /tmp/device_rows.tgz $OUT/
fi
