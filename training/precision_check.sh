#!/usr/bin/env bash
# bf16 autocast + channels_last against fp32 on CPU (issue 16, item 1): the same seed, data, init and
# steps, one thread each, one after the other; held-out PSNR on the run's held-out thumbnails (the 93
# comparison files with the default DATA) and the measured seconds per step. Writes docs/precision.json.
set -euo pipefail
RUNS=${RUNS:-runs/precision}
DATA=${DATA:-../shared/data/imagenet-samples}
STEPS=${STEPS:-600}
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1
for precision in fp32 bf16; do
    rm -rf "$RUNS/$precision"
    vqtok train-vqvae --run "$RUNS/$precision" --data "$DATA,photos" --init artifacts/default --threads 1 \
        --precision "$precision" --batch-size 32 --lr 3e-4 --warmup 50 --steps "$STEPS" --eval-every "$STEPS" \
        --ckpt-every "$STEPS" --seed 0 --cache "$RUNS/cache"
done
python - "$RUNS" "$STEPS" <<'PY'
import json, statistics, sys
from pathlib import Path

runs, steps = Path(sys.argv[1]), int(sys.argv[2])
out = {"command": "bash training/precision_check.sh", "steps": steps, "batch_size": 32, "threads": 1,
       "init": "artifacts/default", "data": "imagenet-samples,photos", "runs": {}}
for p in ("fp32", "bf16"):
    rows = [json.loads(line) for line in (runs / p / "metrics.jsonl").read_text().splitlines()]
    held = [r for r in rows if r.get("split") == "heldout"][-1]
    secs = [r["sec_per_step"] for r in rows if r.get("split") == "train" and "sec_per_step" in r]
    out["runs"][p] = {"heldout_psnr": held["psnr"], "heldout_images": held["images"],
                      "median_sec_per_step": statistics.median(secs)}
out["psnr_bf16_minus_fp32_db"] = out["runs"]["bf16"]["heldout_psnr"] - out["runs"]["fp32"]["heldout_psnr"]
out["speedup_bf16"] = out["runs"]["fp32"]["median_sec_per_step"] / out["runs"]["bf16"]["median_sec_per_step"]
Path("docs/precision.json").write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out, indent=2))
PY
