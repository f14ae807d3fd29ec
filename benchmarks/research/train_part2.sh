#!/bin/bash
# Device command 2 of the research model (one H200): the VAR on command 1's VQVAE (its export committed under
# benchmarks/2026-12-02-session10/part1/EXPORTS.md: carried in .research/), the VAR export back as a tarball.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
T0=$(date +%s)
W=/tmp/research; mkdir -p $W
for f in .research/vqvae_export.tgz; do tar -C $W -xzf $f; done
python -m experiments.train --config=configs/train_research.py --workdir=$W --stage=var --config.var.log_every=500 \
    2>&1 | grep -v "^W" | tee $OUT/train2.log
tar -C $W -czf $OUT/var_export.tgz var/export
echo "var wall $(( $(date +%s) - T0 )) s" | tee -a $OUT/train2.log
