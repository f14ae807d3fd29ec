# Launched with setsid: the d16 W4A6 pipeline on GPU 0, the ablation table split over GPUs 1-3, then d30 recon profile.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
mkdir -p runs/logs runs/parts; L=runs/logs
if command -v taskset >/dev/null; then T0="taskset -c 0-11"; T1="taskset -c 12-63"; else T0=""; T1=""; fi
(
  date +%s > $L/q16.start
  CUDA_VISIBLE_DEVICES=0 $T0 python3 -m experiments.benchmark --presets "" --quant_presets "" --save_random d16:runs/d16_random > $L/save.log 2>&1
  date +%s > $L/q16.t0
  CUDA_VISIBLE_DEVICES=0 $T0 python3 -m experiments.quantize --config=w4a6 --checkpoint=runs/d16_random --workdir=runs/q16 --config.samples.num=0 > $L/q16.log 2>&1
  date +%s > $L/q16.t1
  CUDA_VISIBLE_DEVICES=0 $T0 python3 .refs/prof_recon.py $L d30 > $L/prof30.log 2>&1
  touch $L/gpu0.done
) &
COMMON="--num_images=1000 --workdir=runs/ablate --diag_samples=0"
ab() {  # gpu preset methods tag
  CUDA_VISIBLE_DEVICES=$1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 $T1 python3 -m experiments.ablate --presets=$2 --methods=$3 $COMMON --out=runs/parts/$4.md > $L/ab_$4.log 2>&1
  echo $? > $L/ab_$4.rc
}
NS=baseline,brecq,brecq_resample; S=brecq_sas,full
ab 1 w8a8 $NS p1 &
while [ ! -f runs/ablate/fp/eval_time.json ]; do sleep 2; done
ab 1 w8a8 $S p2 &
ab 2 w6a6 $NS p3 & ab 2 w6a6 $S p4 &
ab 3 w4a8 $NS p5 & ab 3 w4a8 $S p6 &
ab 1 w4a6 $NS p7 & ab 2 w4a6 $S p8 &
ab 3 w4a4 $NS p9 & ab 3 w4a4 $S p10 &
wait
CUDA_VISIBLE_DEVICES=1 python3 -m experiments.ablate --presets=w8a8,w6a6,w4a8,w4a6,w4a4 --methods=baseline,brecq,brecq_sas,brecq_resample,full --num_images=1000 --workdir=runs/ablate --out=RESULTS.md > $L/ab_final.log 2>&1
echo $? > $L/ab_final.rc
touch $L/all.done
