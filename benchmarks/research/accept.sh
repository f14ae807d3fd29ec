#!/bin/bash
# Device command 3 (one H200): the research model's acceptance numbers, as part 1 of its results table. Ships the
# trained exports (part 1's VQVAE and classifier, part 2's VAR export carried in .research/) into this tree, then
# runs the ablation protocol for the W4A4 baseline: FP over seeds 0-2 (3 × 1,000 images) and 3-5 (the noise floor),
# the shared float32 calibration set, W4A4 baseline over seeds 0-2, 2,000 paired bootstrap replicates.
# Acceptance (issue 18): FP accuracy ≥ 0.9; FP − W4A4 accuracy ≥ 3 × the half-width of FP's interval; W4A4's FD to
# FP ≥ 10 × the noise row's FD to FP. The part's JSON, markdown and bootstrap values come back for the merge.
# Arguments go to experiments.ablate after its own (the last of a flag wins), e.g. other sampling settings:
#   accept.sh --eval.top_p=0.5 --workdir=/tmp/research/ablate_p05 --out=$OUT/part_p05.md
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
T0=$(date +%s)
W=/tmp/research; mkdir -p $W
for f in .research/vqvae_export.tgz .research/classifier_export.tgz .research/var_export.tgz; do tar -C $W -xzf $f; done
python -m experiments.ship_default --model=research --workdir=$W --commit=$(cat .research/commit 2>/dev/null || echo unknown) \
    --device="NVIDIA H200" --date=$(date -u +%F) 2>&1 | tail -1
python -m experiments.ablate --checkpoint=research --presets=w4a4 --methods=baseline --extra_calib= \
    --workdir=$W/ablate --out=$OUT/part_w4a4_baseline.md --per_device_batch=250 --feature_batch=250 \
    --diag_samples=0 "$@" 2>&1 | grep -v "^W\|^I" | tee $OUT/ablate.log
for d in $W/ablate*; do n=$(basename $d); cp $d/fp/eval_s0/grid.png $OUT/${n}_fp_grid.png
    cp $d/w4a4_baseline/eval_s0/grid.png $OUT/${n}_w4a4_grid.png; done
echo "total $(( $(date +%s) - T0 )) s" | tee -a $OUT/ablate.log
