#!/usr/bin/env bash
# Quantizer/width ablation (issue 9): every variant trained for the same small number of steps on the
# same data and evaluated on the same held-out thumbnails (VQ-VAE, then both priors, then evaluate).
# Sequential and resumable; RUNS, DATA, STEPS, PSTEPS override the defaults.
set -euo pipefail
RUNS=${RUNS:-runs/ablation}
DATA=${DATA:-../shared/data/imagenet-samples}
SOURCES="$DATA,photos"
STEPS=${STEPS:-200}
PSTEPS=${PSTEPS:-100}
export OMP_WAIT_POLICY=PASSIVE
COMMON=(--data "$SOURCES" --cache "$RUNS/cache" --threads 1 --batch-size 32 --steps "$STEPS" --warmup 50
        --ckpt-every 100 --eval-every "$STEPS" --log-every 20)

variant() {  # variant NAME VQVAE-FLAGS...
    local name=$1; shift
    local dir=$RUNS/$name
    [ -f "$dir/eval/eval.json" ] && return 0
    if [ -f "$dir/vqvae/checkpoint.pt" ]; then vqtok train-vqvae --run "$dir/vqvae" --resume
    else vqtok train-vqvae --run "$dir/vqvae" "${COMMON[@]}" "$@"; fi
    for level in top bottom; do
        if [ -f "$dir/prior_$level/checkpoint.pt" ]; then vqtok train-prior --run "$dir/prior_$level" --resume
        else vqtok train-prior --run "$dir/prior_$level" --vqvae "$dir/vqvae" --level $level --data "$SOURCES" \
            --threads 1 --batch-size 32 --steps "$PSTEPS" --warmup 30 --eval-every "$PSTEPS" --ckpt-every 50; fi
    done
    vqtok evaluate --vqvae "$dir/vqvae" --prior-top "$dir/prior_top" --prior-bottom "$dir/prior_bottom" \
        --no-native --out "$dir/eval"
}

variant ema-ste
variant ema-rotation --gradient rotation
variant factorized-ste --quantizer factorized
variant fsq-ste --quantizer fsq --fsq-levels 8,8,8
variant ema-ste-wide --channels 192 --res-channels 64
