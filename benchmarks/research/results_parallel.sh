#!/bin/bash
# Several parts of RESULTS.md side by side on one H200 (issue 18 item 4). The research model (width 128) leaves the
# GPU mostly idle in one process — a reconstruction row is launch-bound — so parts run as separate processes, each
# with its share of GPU memory, its own workdir (each samples the FP sets itself: the same keys on the same GPU), and
# its own copy of the persistent compilation cache (JAX writes cache files in place, unlocked: parts sharing one
# directory could read each other's half-written entries), merged back into /tmp/research/jax_cache when it ends. Each part is one results_part.sh invocation and comes back as $OUT/NAME.tgz
# (at most 8 parts per command: the device returns at most 8 files). A part's leading VAR=value words set its
# environment, e.g.
#   PART_TIMEOUT=540 results_parallel.sh "w4a6_sas --presets=w4a6 --methods=brecq_sas" \
#       "SHARE_CALIB= c2026_base --presets=w4a4 --extra_calib=w4a4:2026 --runs=w4a4_baseline_c2026"
# Its tables then say that their times include shared devices (the merge keeps that note).
DIR=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] && [ $# -le 8 ] || { echo "results_parallel.sh: give 1 to 8 part specs, got $#" >&2; exit 2; }
FRAC=$(python3 -c "print(round(0.9 / $#, 3))")
mkdir -p /tmp/research/jax_cache
run_spec() {
    local envs=() args=() t
    for t in $1; do
        if [ ${#args[@]} -eq 0 ] && [[ $t == *=* && $t != -* ]]; then envs+=("$t"); else args+=("$t"); fi
    done
    local cache=/tmp/research/jax_cache_${args[0]}
    mkdir -p $cache && cp -r /tmp/research/jax_cache/. $cache/ 2>/dev/null
    env XLA_PYTHON_CLIENT_MEM_FRACTION=$FRAC JAX_COMPILATION_CACHE_DIR=$cache "${envs[@]}" \
        bash "$DIR/results_part.sh" "${args[@]}" > "/tmp/research/parallel_${args[0]}.log" 2>&1
    local rc=$?
    cp -rn $cache/. /tmp/research/jax_cache/
    echo "[${args[0]}] exit $rc — $(tail -1 "/tmp/research/parallel_${args[0]}.log")"
}
T0=$(date +%s)
for spec in "$@"; do run_spec "$spec" & sleep 2; done
wait
echo "all parts: $(( $(date +%s) - T0 )) s"
