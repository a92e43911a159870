#!/usr/bin/env bash
# One prepared GPU session (issue: the product on a GPU). Run from the repository root on a CUDA machine:
#
#     OUT=/some/folder STAGES="env throughput torchrun demo" bash benchmarks/gpu_check.sh [TARGET_MINUTES]
#     OUT=/some/folder STAGES="env target tests" bash benchmarks/gpu_check.sh [TARGET_MINUTES]
#
# Stages run one after another, in the order below, each alone and with OMP_NUM_THREADS set (the first GPU session
# ran them side by side, every torch process on 16 intra-op threads: the 16 cores were oversubscribed and the demos,
# the torchrun check and the target ran out of time; benchmarks/results/gpu_session_2026-12-04.json). All stages
# together need more than one 10-minute call: split STAGES over two calls as above. Each stage has its own time
# limit; a failing stage does not stop the others; everything lands in $OUT:
#   env        nvidia-smi, torch, the GPU's name                                       -> gpu_env.txt
#   throughput training images/s at 64 and 128 px, fp32 and bf16 autocast, against the
#              device's measured matmul FLOP/s (benchmarks/throughput.py), run alone  -> gpu_throughput.json
#   torchrun   a short train under `torchrun --nproc_per_node 1` (nccl) beside two plain runs (fp32)
#                                                                                       -> gpu_torchrun.json
#   demo       `cryofire demo` with --precision bf16 and fp32                           -> gpu_demo_precision.json
#   target     the 20,000-image two-state target set end to end (benchmarks/target_run.py, training capped
#              at TARGET_MINUTES, default 2)                                            -> gpu_target_n20000.json
#   tests      the suite with CRYOFIRE_DEVICE=cuda (pytest-xdist, 4 workers of 2 threads) -> gpu_tests.log
# A smoke run of the script itself on the CPU: GPU_CHECK_DEVICE=cpu TARGET_N=1200 TARGET_BOX=32
#   DEMO_ARGS="--n 400 --epochs 1" TEST_ARGS="tests/test_predict.py" TP_BOXES=32 OUT=/tmp/o bash benchmarks/gpu_check.sh 0.2
# Wheels of packages missing on the machine may be carried in .whl/ (installed into /tmp/site first).
set -uo pipefail
OUT=${OUT:?set OUT to the results folder}
TARGET_MIN=${1:-2}
DEV=${GPU_CHECK_DEVICE:-cuda}
TARGET_N=${TARGET_N:-20000}
TARGET_BOX=${TARGET_BOX:-64}
DEMO_ARGS=${DEMO_ARGS:-}
TEST_ARGS=${TEST_ARGS:-}
TP_BOXES=${TP_BOXES:-64 128}
STAGES=" ${STAGES:-env throughput torchrun demo target tests} "
want() { [[ "$STAGES" == *" $1 "* ]]; }
export OMP_NUM_THREADS=8
ROOT=$(pwd)
LOG=$OUT/gpu_log.txt
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import starfile, mrcfile, cryosparc, eulerangles" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=python3
WORK=/tmp/gpu_work
rm -rf "$WORK"; mkdir -p "$WORK"

if want env; then
stamp "env"
{ nvidia-smi; $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')";
  $PY -c "import cryofire_ext, starfile, mrcfile, cryosparc, eulerangles, typer; print('imports ok')";
  nproc; free -g; } >"$OUT/gpu_env.txt" 2>&1
tail -3 "$OUT/gpu_env.txt" | tee -a "$LOG"
fi

if want throughput; then
stamp "throughput (alone)"
for box in $TP_BOXES; do for prec in fp32 bf16; do
  timeout 90 $PY benchmarks/throughput.py --device $DEV --box $box --precision $prec --steps 20 --threads 4 \
    --out "$WORK/tp_${box}_${prec}.json" >>"$LOG" 2>&1 || stamp "throughput $box $prec FAILED"
  timeout 90 $PY benchmarks/throughput.py --device $DEV --box $box --precision $prec --steps 20 --batch 256 \
    --threads 4 --out "$WORK/tp_${box}_${prec}_b256.json" >>"$LOG" 2>&1 || stamp "throughput $box $prec b256 FAILED"
done; done
$PY - "$WORK" "$OUT/gpu_throughput.json" <<'EOF'
import glob, json, sys
rows = [json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + "/tp_*.json"))]
json.dump({"command": "bash benchmarks/gpu_check.sh (benchmarks/throughput.py --device cuda --box B --precision P "
           "--steps 20 [--batch 256])", "results": rows}, open(sys.argv[2], "w"), indent=1)
for r in rows:
    print(f"box {r['box']} batch {r['batch']} {r['precision']}: {r['images_per_s']:.0f} img/s, "
          f"{r['fraction_of_matmul']:.4f} of {r['matmul']} matmul {r['matmul_flops_per_s']/1e12:.0f} TFLOP/s")
EOF
fi

if want torchrun; then
stamp "torchrun nccl vs plain"
$PY -m cli.main simulate --phantom -n 1000 -o "$WORK/tr_data" >>"$LOG" 2>&1
echo '{"zdim": 2, "epochs": 2, "batch_size": 32, "warm_images": 500, "warm_steps": 100, "warm_rotations": 2000,
 "pose_only_images": 500, "march_images": 1000, "distill_images": 500, "polish_rounds": 1, "precision": "fp32",
 "num_workers": 0, "symmetric": false}' >"$WORK/tr_cfg.json"
TRARGS="train $WORK/tr_data/particles.star --config $WORK/tr_cfg.json --device $DEV"
timeout 150 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m cli.main $TRARGS -o "$WORK/tr_ddp" \
  >"$WORK/tr_ddp.log" 2>&1; stamp "torchrun rc $?"
for r in one two; do
  timeout 150 $PY -m cli.main $TRARGS -o "$WORK/tr_$r" >"$WORK/tr_$r.log" 2>&1; stamp "plain $r rc $?"
done
$PY - "$WORK" "$OUT/gpu_torchrun.json" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from cryofire_ext.metrics import geodesic_deg
w = Path(sys.argv[1]); res = {"command": "torchrun --standalone --nproc_per_node 1 -m cli.main train "
      "tr_data/particles.star --config tr_cfg.json --device cuda  vs  python -m cli.main train ... (twice); "
      "1,000 phantom particles, fp32, 2 epochs, 1 refinement round (gpu_check.sh)"}
runs = {}
for name in ("tr_ddp", "tr_one", "tr_two"):
    f = w / name / "predictions.npz"
    if f.is_file():
        runs[name] = np.load(f)
    res[name + "_log_tail"] = (w / f"{name}.log").read_text()[-1500:] if (w / f"{name}.log").is_file() else ""
def cmp(a, b):
    ra, rb = runs[a], runs[b]
    h = [json.loads((w / n / "history.json").read_text()) for n in (a, b)]
    return {"max_abs_diff_A": float(np.abs(ra["A"] - rb["A"]).max()),
            "median_rotation_diff_deg": float(np.median(geodesic_deg(ra["A"], rb["A"]))),
            "max_rotation_diff_deg": float(np.max(geodesic_deg(ra["A"], rb["A"]))),
            "max_abs_diff_shifts_A": float(np.abs(ra["shifts_A"] - rb["shifts_A"]).max()),
            "max_abs_diff_z": float(np.abs(ra["z"] - rb["z"]).max()),
            "loss_history_max_rel_diff": float(max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(*h)))}
for a, b in (("tr_ddp", "tr_one"), ("tr_two", "tr_one")):
    if a in runs and b in runs:
        try:
            res[f"{a}_vs_{b}"] = cmp(a, b)
        except Exception as exc:  # report, do not lose the rest
            res[f"{a}_vs_{b}"] = {"error": repr(exc)}
json.dump(res, open(sys.argv[2], "w"), indent=1)
print({k: v for k, v in res.items() if "_vs_" in k})
EOF

fi

if want demo; then
stamp "demo bf16 / fp32"
for prec in bf16 fp32; do
  s=$(date +%s)
  timeout 240 $PY -m cli.main demo -o "$WORK/demo_$prec" --device $DEV --precision $prec $DEMO_ARGS >"$WORK/demo_$prec.log" 2>&1
  echo "demo $prec rc $? in $(( $(date +%s) - s )) s" | tee -a "$LOG"
done
$PY - "$WORK" "$OUT/gpu_demo_precision.json" <<'EOF'
import json, sys
from pathlib import Path
res = {"command": "python -m cli.main demo -o DIR --device cuda --precision {bf16,fp32} (gpu_check.sh, alone)"}
for p in ("bf16", "fp32"):
    f = Path(sys.argv[1]) / f"demo_{p}" / "metrics.json"
    if f.is_file():
        m = json.loads(f.read_text()); m.pop("config", None); res[p] = m
    else:
        res[p] = {"error": (Path(sys.argv[1]) / f"demo_{p}.log").read_text()[-3000:]}
json.dump(res, open(sys.argv[2], "w"), indent=1, default=float)
for p in ("bf16", "fp32"):
    m = res[p]
    print(p, {k: m.get(k) for k in ("median_rotation_error_deg", "median_shift_error_px", "clustering_error", "wall_s")})
EOF
fi

if want target; then
stamp "target"
( timeout 400 $PY benchmarks/target_run.py --n $TARGET_N --box $TARGET_BOX --snr 0.1 --shift-px 4 --mix 0.9 0.1 \
    --minutes "$TARGET_MIN" --eval 0 --threads 6 --device $DEV --out-dir "$WORK/target20k" \
    --out "$OUT/gpu_target_n20000.json" >"$WORK/target.log" 2>&1; echo "target rc $?" >>"$WORK/target.log" )
  cp "$WORK/target.log" "$OUT/gpu_target.log"; tail -22 "$WORK/target.log"
fi

if want tests; then
stamp "tests"
( OMP_NUM_THREADS=2 CRYOFIRE_DEVICE=$DEV timeout 330 $PY -m pytest -q -n 4 -p no:cacheprovider -rfEs --timeout 240 $TEST_ARGS \
    >"$OUT/gpu_tests.log" 2>&1; echo "pytest rc $?" >>"$OUT/gpu_tests.log" )
  tail -25 "$OUT/gpu_tests.log" | tee -a "$LOG"
fi
stamp "done"
