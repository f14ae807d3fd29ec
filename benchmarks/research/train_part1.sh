#!/bin/bash
# Device command 1 of the research model (one H200): VQVAE + classifier, exports back as tarballs, then a short
# VAR run (stopped at step 300) whose logged rate sets configs/train_research.py's var.num_steps for command 2.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
W=/tmp/research
T0=$(date +%s)
python -m experiments.train --config=configs/train_research.py --workdir=$W --stage=vqvae,classifier \
    --config.vqvae.log_every=500 --config.classifier.log_every=1000 2>&1 | grep -v "^W" | tee $OUT/train1.log
tar -C $W -czf $OUT/vqvae_export.tgz vqvae/export
tar -C $W -czf $OUT/classifier_export.tgz classifier/export
echo "vqvae+classifier wall $(( $(date +%s) - T0 )) s" | tee -a $OUT/train1.log
timeout 110 python -m experiments.train --config=configs/train_research.py --workdir=$W --stage=var \
    --config.stop_at_step=300 --config.var.log_every=100 --config.var.ckpt_every=100000 2>&1 | grep "\[var\]" \
    | tee $OUT/var_probe.log
echo "total wall $(( $(date +%s) - T0 )) s" | tee -a $OUT/train1.log
