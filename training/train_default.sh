#!/usr/bin/env bash
# Reproduces artifacts/default: the previous default bundle (8 built-in photos, commit 96d3b0f) fine-tuned
# on the ImageNet sample photos plus the built-in photos (a hash-chosen 10 % of the folder's files and two
# photos held out): VQ-VAE-2 at 64x64, K=512 at both levels (EMA codebooks), then both priors, held-out
# evaluation and export. Every stage resumes if re-run.
# DATA must point at the imagenet-samples folder (see ../shared/data/README.md for its terms).
set -euo pipefail
RUNS=${RUNS:-runs/default}
DATA=${DATA:-../shared/data/imagenet-samples}
PREV=${PREV:-$RUNS/prev_default}
SOURCES="$DATA,photos"
TERMS="ImageNet images (imagenet-samples: one photo per ILSVRC class): use for non-commercial research and education only"
export OMP_WAIT_POLICY=PASSIVE  # keeps torch from spinning when another process shares the cores

if [ ! -f "$PREV/manifest.json" ]; then  # the bundle the run starts from
    mkdir -p "$PREV" && git archive 96d3b0f artifacts/default | tar -x -C "$PREV" --strip-components 2
fi

stage() {  # stage RUN_DIR ARGS...: start a run, or resume it if a checkpoint exists
    local run=$1; shift
    if [ -f "$run/checkpoint.pt" ]; then vqtok "$@" --run "$run" --resume; else vqtok "$@" --run "$run"; fi
}

stage "$RUNS/vqvae" train-vqvae --data "$SOURCES" --data-terms "$TERMS" --init "$PREV" --threads 1 \
    --batch-size 32 --lr 3e-4 --warmup 50 --steps 500 --ckpt-every 50 --eval-every 250
for level in top bottom; do
    stage "$RUNS/prior_$level" train-prior --vqvae "$RUNS/vqvae" --data "$SOURCES" --level $level --init "$PREV" \
        --threads 1 --batch-size 32 --lr 3e-4 --warmup 20 --steps 450 --eval-every 100 --ckpt-every 25 &
done
wait
vqtok evaluate --vqvae "$RUNS/vqvae" --prior-top "$RUNS/prior_top" --prior-bottom "$RUNS/prior_bottom" --out "$RUNS/eval"
vqtok export --vqvae "$RUNS/vqvae" --prior-top "$RUNS/prior_top" --prior-bottom "$RUNS/prior_bottom" \
    --eval "$RUNS/eval/eval.json" --out artifacts/default --name vqtok-default
