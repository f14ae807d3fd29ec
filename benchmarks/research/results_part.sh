#!/bin/bash
# One part of RESULTS.md on the research model (one H200 command; issue 18 item 4). Runs the ablation protocol
# (FP over seeds 0-2, the noise floor over 3-5, 2,000 paired replicates) at the research sampling (top-p 0.5) for
# the rows its flags choose, with the settings of part_p05 (benchmarks/2026-12-02-session12/accept_p05), so that
# every part merges with it. Its outputs come back as one $OUT/NAME.tgz (the device returns at most 8 files): the
# part's .md/.json/.replicates.npz, its log, and the calibration sets it made (calib_RUN.tgz); the sets of
# earlier parts, carried as .research/calib_SEED.tgz, are shared instead of sampled again (--calibration).
#   results_part.sh NAME [ablate flags], e.g. results_part.sh w4a4_recon --presets=w4a4 --methods=brecq,full
# Parts that share a workdir (WORKDIR=... in the environment) skip the FP evaluations they find there, and share
# a persistent JAX compilation cache (a reconstruction row after the first skips most of its ~125 s compilation).
# PART_TIMEOUT=S sends the ablation SIGTERM after S seconds: it writes the table of the runs it finished (the rows
# come back), lists the rest as not run, and exits; GRACE (default 60) seconds later it is killed if still writing
# (a signal waits for a compilation in progress to end). The same command again on the same warm machine (same
# NAME, so the same workdir) resumes it: finished runs and evaluations are skipped and a reconstruction continues
# from its last finished unit. Keep PART_TIMEOUT + GRACE under the device's limit per command. Run parts one at a
# time: a part run beside three others on one GPU (session 18) sampled an FP set that differs from every
# sequential part's, so it did not merge.
# A part of seed-2026 runs only (e.g. --extra_calib=w4a4:2026 --runs=w4a4_baseline_c2026) sets SHARE_CALIB=2026
# once that set exists, else SHARE_CALIB= (it samples the set, and leaves it for the next parts on this machine).
set -o pipefail
NAME=$1; shift
# once a machine (a part started beside a running one must not reinstall the files that one imports)
[ -d /tmp/site/clu ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
T0=$(date +%s); MARK=$(mktemp)      # sets older than MARK were made by an earlier part on this workdir
W=${WORKDIR:-/tmp/research/$NAME}; O=/tmp/research/out_$NAME; mkdir -p $W $O
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/research/jax_cache} JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
# SHARE_CALIB: the calibration seeds whose sets this part shares instead of sampling them (default 2025; empty:
# none), each from .research/calib_SEED.tgz or /tmp/research/calib_SEED.tgz (left by a part on this machine that
# made it); ablate refuses a set no run of the part uses.
CAL=()
for s in $(echo "${SHARE_CALIB-2025}" | tr , ' '); do
    for f in .research/calib_$s.tgz /tmp/research/calib_$s.tgz; do
        [ -f $f ] || continue
        d=/tmp/research/cal_${NAME}_$s; mkdir -p $d && tar -C $d -xzf $f && CAL+=($d/calibration); break
    done
done
CALFLAG=(); [ ${#CAL[@]} -gt 0 ] && CALFLAG=(--calibration=$(IFS=,; echo "${CAL[*]}"))
timeout -k ${GRACE:-60} ${PART_TIMEOUT:-0} python -m experiments.ablate --checkpoint=research --eval.top_p=0.5 --extra_calib= \
    --per_device_batch=250 --feature_batch=250 --diag_samples=0 --workdir=$W --out=$O/part_$NAME.md "${CALFLAG[@]}" \
    "$@" 2>&1 | grep --line-buffered -v "^W\|^I" | tee -a $O/$NAME.log
for c in $W/*/ptq/state/calibration; do             # the sets this part made (runs of an extra seed end in _cSEED)
    [ -d "$c" ] && ! [ "$MARK" -nt "$c" ] || continue
    run=$(basename $(dirname $(dirname $(dirname $c)))); seed=2025
    [[ $run =~ _c([0-9]+)$ ]] && seed=${BASH_REMATCH[1]}
    [[ ",${SHARE_CALIB-2025}," == *",$seed,"* ]] && continue
    tar -C $(dirname $c) -czf $O/calib_${run}.tgz calibration
    [ -f /tmp/research/calib_$seed.tgz ] || cp $O/calib_${run}.tgz /tmp/research/calib_$seed.tgz
done
echo "total $(( $(date +%s) - T0 )) s" | tee -a $O/$NAME.log
[ -n "$OUT" ] && tar -C $O -czf $OUT/$NAME.tgz .
