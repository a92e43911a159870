#!/usr/bin/env bash
# The short second GPU call after gpu_check.sh's first run showed bf16 autocast broken (fixed since): bf16
# throughput, the demo in bf16 and fp32, a tiny torchrun (nccl) run beside a plain one, and the test modules
# that failed on CUDA, all side by side (timings under load).  OUT=/folder bash benchmarks/gpu_rerun.sh
set -uo pipefail
OUT=${OUT:?set OUT}; ROOT=$(pwd); LOG=$OUT/gpu_log2.txt; T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import starfile, mrcfile, cryosparc, eulerangles" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=python3; W=/tmp/gpu_work2; rm -rf "$W"; mkdir -p "$W"
stamp "throughput bf16"
for box in 64 128; do for b in 32 256; do
  timeout 40 $PY benchmarks/throughput.py --device cuda --box $box --precision bf16 --steps 20 --batch $b --threads 4 \
    --out "$W/tp_${box}_bf16_b$b.json" >>"$LOG" 2>&1 || stamp "throughput $box b$b FAILED"
done; done
$PY -c "
import glob, json; rows=[json.load(open(f)) for f in sorted(glob.glob('$W/tp_*.json'))]
json.dump(rows, open('$OUT/gpu_throughput_bf16.json', 'w'), indent=1)
[print(r['box'], r['batch'], round(r['images_per_s']), round(r['fraction_of_matmul'], 4)) for r in rows]"
stamp "demos, torchrun, tests (side by side)"
for p in bf16 fp32; do
  ( s=$(date +%s); timeout 185 $PY -m cli.main demo -o "$W/demo_$p" --device cuda --precision $p >"$W/demo_$p.log" 2>&1
    echo "demo $p rc $? in $(( $(date +%s) - s )) s" >>"$LOG" ) &
done
( CRYOFIRE_DEVICE=cuda timeout 185 $PY -m pytest -q -n 3 -p no:cacheprovider -rfE tests/test_model.py \
    tests/test_predict.py tests/test_train.py tests/test_demo.py tests/test_relion_star.py >"$OUT/gpu_tests2.log" 2>&1
  echo "pytest rc $?" >>"$OUT/gpu_tests2.log" ) &
$PY -m cli.main simulate --phantom -n 400 -o "$W/tr_data" >>"$LOG" 2>&1
echo '{"zdim": 2, "epochs": 1, "warm_images": 400, "warm_steps": 50, "warm_rotations": 1000, "warm_rounds": 1,
 "pose_only_images": 200, "march_images": 400, "distill_images": 200, "polish_rounds": 0, "precision": "fp32",
 "num_workers": 0, "symmetric": false}' >"$W/cfg.json"
A="train $W/tr_data/particles.star --config $W/cfg.json --device cuda"
timeout 160 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m cli.main $A -o "$W/ddp" >"$W/ddp.log" 2>&1 &
P1=$!
timeout 160 $PY -m cli.main $A -o "$W/one" >"$W/one.log" 2>&1; echo "plain rc $?" >>"$LOG"
wait $P1; echo "torchrun rc $?" >>"$LOG"
$PY - "$W" "$OUT/gpu_rerun.json" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from cryofire_ext.metrics import geodesic_deg
w = Path(sys.argv[1]); res = {"command": "bash benchmarks/gpu_rerun.sh"}
try:
    a, b = np.load(w / "ddp" / "predictions.npz"), np.load(w / "one" / "predictions.npz")
    ha, hb = (json.loads((w / n / "history.json").read_text()) for n in ("ddp", "one"))
    res["torchrun_vs_plain"] = {"median_rotation_diff_deg": float(np.median(geodesic_deg(a["A"], b["A"]))),
        "max_rotation_diff_deg": float(np.max(geodesic_deg(a["A"], b["A"]))),
        "max_abs_diff_shifts_A": float(np.abs(a["shifts_A"] - b["shifts_A"]).max()),
        "max_abs_diff_z": float(np.abs(a["z"] - b["z"]).max()),
        "loss_history": [[x["loss"], y["loss"]] for x, y in zip(ha, hb)]}
except Exception as exc:
    res["torchrun_vs_plain"] = {"error": repr(exc), "ddp_log": (w / "ddp.log").read_text()[-2000:],
                                "one_log": (w / "one.log").read_text()[-1000:]}
json.dump(res, open(sys.argv[2], "w"), indent=1)
print(res["torchrun_vs_plain"])
EOF
wait
$PY - "$W" "$OUT/gpu_demo_precision.json" <<'EOF'
import json, sys
from pathlib import Path
res = {"command": "python -m cli.main demo -o DIR --device cuda --precision {bf16,fp32} (gpu_rerun.sh: both demos, "
       "a torchrun check and five test modules side by side on one GPU and 16 cores)"}
for p in ("bf16", "fp32"):
    f = Path(sys.argv[1]) / f"demo_{p}" / "metrics.json"
    if f.is_file():
        m = json.loads(f.read_text()); m.pop("config", None); res[p] = m
    else:
        res[p] = {"error": (Path(sys.argv[1]) / f"demo_{p}.log").read_text()[-3000:]}
    print(p, {k: res[p].get(k) for k in ("median_rotation_error_deg", "median_shift_error_px", "clustering_error", "wall_s")})
json.dump(res, open(sys.argv[2], "w"), indent=1, default=float)
EOF
tail -4 "$OUT/gpu_tests2.log"; cat "$LOG" | grep -v "^{" | tail -8
cp "$W/demo_bf16.log" "$OUT/gpu_demo_bf16.log" 2>/dev/null
stamp done
