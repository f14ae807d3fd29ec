#!/bin/bash
# Throughput probe of the research VAR (one H200): steps/s at larger batches, on the committed part-1 VQVAE, to size
# a longer second training round. Short runs (stopped at step 200), nothing exported.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
for B in 256 512; do
    W=/tmp/probe$B; mkdir -p $W
    for f in .research/vqvae_export.tgz; do tar -C $W -xzf $f; done
    echo "batch $B" | tee -a $OUT/probe.log
    timeout 140 python -m experiments.train --config=configs/train_research.py --workdir=$W --stage=var \
        --config.var.batch_size=$B --config.stop_at_step=200 --config.var.log_every=50 --config.var.ckpt_every=100000 \
        2>&1 | grep "\[var\]" | tee -a $OUT/probe.log
done
