#!/usr/bin/env bash
# Reproduces artifacts/default: VQ-VAE-2 at 64x64, K=512 at both levels (EMA codebooks), trained on the
# ImageNet sample photos plus the built-in photos (a hash-chosen 10 % of the folder's files and two
# photos held out), then both priors, held-out evaluation and export. Every stage resumes if re-run.
# DATA must point at the imagenet-samples folder (see ../shared/data/README.md for its terms).
set -euo pipefail
RUNS=${RUNS:-runs/default}
DATA=${DATA:-../shared/data/imagenet-samples}
SOURCES="$DATA,photos"
TERMS="ImageNet images (imagenet-samples: one photo per ILSVRC class): use for non-commercial research and education only"
VQVAE_STEPS=${VQVAE_STEPS:-3500}
PRIOR_STEPS=${PRIOR_STEPS:-1000}
export OMP_WAIT_POLICY=PASSIVE  # keeps torch from spinning when another process shares the cores

stage() {  # stage RUN_DIR ARGS...: start a run, or resume it if a checkpoint exists
    local run=$1; shift
    if [ -f "$run/checkpoint.pt" ]; then vqtok "$@" --run "$run" --resume; else vqtok "$@" --run "$run"; fi
}

stage "$RUNS/vqvae" train-vqvae --data "$SOURCES" --data-terms "$TERMS" --image-size 64 --codes 512 \
    --batch-size 32 --warmup 200 --steps "$VQVAE_STEPS" --threads 1
stage "$RUNS/prior_top" train-prior --vqvae "$RUNS/vqvae" --data "$SOURCES" --level top --batch-size 32 \
    --steps "$PRIOR_STEPS" --threads 1 &
stage "$RUNS/prior_bottom" train-prior --vqvae "$RUNS/vqvae" --data "$SOURCES" --level bottom --batch-size 32 \
    --steps "$PRIOR_STEPS" --threads 1
wait
vqtok evaluate --vqvae "$RUNS/vqvae" --prior-top "$RUNS/prior_top" --prior-bottom "$RUNS/prior_bottom" --out "$RUNS/eval"
vqtok export --vqvae "$RUNS/vqvae" --prior-top "$RUNS/prior_top" --prior-bottom "$RUNS/prior_bottom" \
    --eval "$RUNS/eval/eval.json" --out artifacts/default --name vqtok-default
