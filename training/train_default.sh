#!/usr/bin/env bash
# Reproduces artifacts/default: VQ-VAE-2 on the built-in photos at 64x64, K=512 at both levels,
# then both priors, held-out evaluation and export. Every stage resumes if re-run after a stop.
set -euo pipefail
RUNS=${RUNS:-runs/default}
export OMP_WAIT_POLICY=PASSIVE  # keeps torch from spinning when another process shares the cores

stage() {  # stage RUN_DIR ARGS...: start a run, or resume it if a checkpoint exists
    local run=$1; shift
    if [ -f "$run/checkpoint.pt" ]; then vqtok "$@" --run "$run" --resume; else vqtok "$@" --run "$run"; fi
}

stage "$RUNS/vqvae" train-vqvae --data photos --image-size 64 --codes 512 --steps 3000
stage "$RUNS/prior_top" train-prior --vqvae "$RUNS/vqvae" --level top --steps 1500
stage "$RUNS/prior_bottom" train-prior --vqvae "$RUNS/vqvae" --level bottom --steps 1500
vqtok evaluate --vqvae "$RUNS/vqvae" --prior-top "$RUNS/prior_top" --prior-bottom "$RUNS/prior_bottom" --out "$RUNS/eval"
vqtok export --vqvae "$RUNS/vqvae" --prior-top "$RUNS/prior_top" --prior-bottom "$RUNS/prior_bottom" \
    --eval "$RUNS/eval/eval.json" --out artifacts/default --name vqtok-default
