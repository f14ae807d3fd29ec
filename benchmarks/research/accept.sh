#!/bin/bash
# Device command 3 (one H200): the research model's acceptance numbers. Ships the trained exports (carried in
# .research/) into this tree, evaluates 6,000 FP images (seed 0: images 0–2999 are set A, 3000–5999 set B, the
# same labels i mod 100), quantizes the W4A4 baseline (calibration in float32 at HIGHEST) and evaluates its first
# 3,000 images on set A's keys; per-image classifier outputs come back for the paired bootstrap on the CPU.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
T0=$(date +%s)
W=/tmp/research; mkdir -p $W
for f in benchmarks/2026-12-02-session10/part1/*.tgz .research/var_export.tgz; do tar -C $W -xzf $f; done
python -m experiments.ship_default --model=research --workdir=$W --commit=$(cat .research/commit 2>/dev/null || echo unknown) \
    --device="NVIDIA H200" --date=2026-12-02 2>&1 | tail -1
python -m experiments.evaluate --checkpoint=research --out=$W/fp --config.num_images=6000 --per_device_batch=500 \
    --config.grid_images=100 2>&1 | grep -v "^W\|^I" | tee $OUT/eval_fp.log
cp $W/fp/per_image.npz $OUT/fp_per_image.npz; cp $W/fp/grid.png $OUT/fp_grid.png
echo "fp done $(( $(date +%s) - T0 )) s" | tee -a $OUT/eval_fp.log
python -m experiments.quantize --config=w4a4:baseline --workdir=$W/w4a4_baseline --checkpoint=research \
    --config.calib.dtype=float32 2>&1 | grep -v "^W" | tail -15 | tee $OUT/quantize.log
echo "quantize done $(( $(date +%s) - T0 )) s" | tee -a $OUT/quantize.log
LEFT=$(( 560 - $(date +%s) + T0 ))
timeout $LEFT python -m experiments.evaluate --checkpoint=$W/w4a4_baseline/model --out=$W/w4a4 \
    --config.num_images=3000 --per_device_batch=500 --config.grid_images=100 2>&1 | grep -v "^W\|^I" \
    | tee $OUT/eval_w4a4.log
cp $W/w4a4/per_image.npz $OUT/w4a4_per_image.npz; cp $W/w4a4/grid.png $OUT/w4a4_grid.png
echo "total $(( $(date +%s) - T0 )) s" | tee -a $OUT/eval_w4a4.log
