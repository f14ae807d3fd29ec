#!/bin/bash
# Two parts of RESULTS.md on one warm H200 (issue 18 item 4), the second started only once the first has made the FP
# and noise-floor sets alone. Session 18 ran parts side by side, each sampling its own FP sets under contention, and
# the sets differed from every sequential part's (no merge); here the FP sets are made by one process on an idle
# GPU, as in every part that merged, and the second part finds them in the shared workdir and skips them. Only the
# PTQ and the quantized rows' evaluations overlap (2 side by side: reconstruction ×1.4 the throughput, session 18).
# The parts run in their own process sessions (setsid), so that they outlive the device command that started them;
# later commands wait for them, and the last one stops them (SIGTERM: each writes the table of the runs it finished)
# in time to bring the tables back.
#   side_by_side.sh start "NAME_A flags…" "NAME_B flags…"   # returns once B has started (A's FP rows done)
#   side_by_side.sh wait SECONDS [STOP_AFTER]                # waits; STOP_AFTER s in, sends the parts SIGTERM
# Each wait copies the parts' finished NAME.tgz (results_part.sh's bundle) and their logs to $OUT.
# B takes B_FRACTION (default 0.18) of the GPU's memory and its own compilation cache; A keeps JAX's defaults, as
# the sequential parts had.
R=/tmp/research; W=${WORKDIR:-$R/pair}; DONE=$R/pair_out; DIR=$(cd "$(dirname "$0")" && pwd)
mkdir -p $DONE
bring_back() {
    [ -n "$OUT" ] || return 0
    cp $DONE/*.tgz $OUT/ 2>/dev/null
    for f in $R/pair_*.log; do [ -f "$f" ] && cp "$f" $OUT/; done
}
progress() {
    for f in $R/pair_*.log; do
        [ -f "$f" ] || continue
        echo "--- $(basename $f): $(grep -c '^=== ' $f) runs started"
        grep -E '^=== |done in|PTQ outputs exist|^wrote|^error|Error|stopped|^total' "$f" | tail -${TAIL:-6} | cut -c1-160
    done
}
launch() {   # launch LOG ENV... -- ARGS...: results_part.sh in its own session, outliving this command
    local log=$1; shift
    local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
    env WORKDIR=$W OUT=$DONE "${envs[@]}" setsid nohup bash $DIR/results_part.sh "$@" > $log 2>&1 < /dev/null &
}
case $1 in
start)
    read -r -a A <<< "$2"; read -r -a B <<< "$3"
    T0=$(date +%s)
    launch $R/pair_${A[0]}.log PART_TIMEOUT=${A_TIMEOUT:-1500} -- "${A[@]}"
    until grep -q '^=== 1/' $R/pair_${A[0]}.log 2>/dev/null; do     # A's FP and noise rows are written
        if ! pgrep -f "results_part.sh ${A[0]}" > /dev/null; then
            echo "part ${A[0]} ended before its FP rows:"; tail -20 $R/pair_${A[0]}.log; bring_back; exit 1
        fi
        sleep 2
    done
    echo "FP rows of ${A[0]} done in $(( $(date +%s) - T0 )) s; starting ${B[0]}"
    launch $R/pair_${B[0]}.log PART_TIMEOUT=${B_TIMEOUT:-1400} XLA_PYTHON_CLIENT_MEM_FRACTION=${B_FRACTION:-0.18} \
        JAX_COMPILATION_CACHE_DIR=$R/jax_cache_b -- "${B[@]}"
    sleep ${SETTLE:-20}
    progress; bring_back;;
wait)
    T0=$(date +%s); sent=
    while pgrep -f "experiments.ablate" > /dev/null; do
        el=$(( $(date +%s) - T0 ))
        if [ -n "$3" ] && [ $el -ge $3 ] && [ -z "$sent" ]; then
            echo "stop after $el s: SIGTERM to the parts"; pkill -TERM -f "^python -m experiments.ablate"; sent=1
        fi
        [ $el -ge $2 ] && break
        sleep 3
    done
    sleep 2                                             # results_part.sh bundles after the ablation exits
    echo "waited $(( $(date +%s) - T0 )) s; still running: $(pgrep -fc 'experiments.ablate')"
    progress; ls -la $DONE; bring_back;;
*)
    echo "usage: side_by_side.sh start \"A…\" \"B…\" | wait SECONDS [STOP_AFTER]" >&2; exit 2;;
esac
