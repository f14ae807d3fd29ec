#!/bin/bash
# Device: the research VAR's training-step breakdown (benchmarks/research/train_breakdown.py) on part 1's VQVAE.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
W=/tmp/bd; mkdir -p $W; tar -C $W -xzf .research/vqvae_export.tgz
timeout 200 python benchmarks/research/train_breakdown.py $W 2>&1 | grep -v "^W\|^I" | tee $OUT/breakdown.md
