#!/usr/bin/env bash
# The default model's long run: trains for as long as it is given, in rounds, and survives interruptions.
#
# Each round fine-tunes the previous round's bundle (the shipped artifacts/default for the first round, or
# when runs/ is gone on a fresh machine): the VQ-VAE-2, then the top prior, then the bottom prior (on the new
# VQ-VAE's codes), all bf16 on one CPU thread by default. It then evaluates on the comparison set (the
# ImageNet sample's held-out share and the two built-in held-out photos: the 93 files of issue 16) and on the
# held-out share of each super-resolution folder, and exports the round's bundle to $RUNS/roundN/bundle.
# It never writes artifacts/default: python -m training.compare_evals says whether a round beats the shipped one,
# and a person commits it.
#
# Every stage checkpoints often and resumes where it stopped, so re-running this script after a kill, a
# reboot or the end of a session continues the same round. ROUNDS=0 (the default) keeps going until killed.
#
# DATA and SR must point at ../shared/data's folders (see its README for their terms).
set -euo pipefail
RUNS=${RUNS:-runs/default}
DATA=${DATA:-../shared/data/imagenet-samples}
SR=${SR:-../shared/data/sr-benchmarks}
ROUNDS=${ROUNDS:-0}
THREADS=${THREADS:-1}
PRECISION=${PRECISION:-bf16}
VQ_STEPS=${VQ_STEPS:-24000}
TOP_STEPS=${TOP_STEPS:-6000}
BOTTOM_STEPS=${BOTTOM_STEPS:-5000}
CACHE_SIDE=${CACHE_SIDE:-1024}  # full-resolution crops: the 1024 px photos are kept at native size
SOURCES="$DATA,$SR/bsd100,$SR/urban100,$SR/sun-hays80,photos"
TERMS="ImageNet images (imagenet-samples: one photo per ILSVRC class): non-commercial research and education only; super-resolution test sets (BSD100, Urban100, Sun-Hays 80): research use, see ../shared/data/sr-benchmarks"
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=$THREADS  # no spinning when another process shares the cores

stage() {  # stage RUN_DIR ARGS...: start a run, or resume it if a checkpoint exists
    local run=$1; shift
    if [ -f "$run/checkpoint.pt" ]; then vqtok "$@" --run "$run" --resume; else vqtok "$@" --run "$run"; fi
}

round=1
while [ "$ROUNDS" = 0 ] || [ "$round" -le "$ROUNDS" ]; do
    dir="$RUNS/round$round"
    if [ -f "$dir/bundle/manifest.json" ]; then round=$((round + 1)); continue; fi
    prev="$RUNS/round$((round - 1))/bundle"
    [ -f "$prev/manifest.json" ] || prev=artifacts/default
    mkdir -p "$dir" && echo "round $round: from $prev ($(date -u +%FT%TZ))" | tee -a "$RUNS/rounds.log"
    common=(--data "$SOURCES" --init "$prev" --threads "$THREADS" --precision "$PRECISION" --batch-size 32
            --cache "$RUNS/cache" --cache-side "$CACHE_SIDE")
    stage "$dir/vqvae" train-vqvae "${common[@]}" --data-terms "$TERMS" --lr 3e-4 --warmup 200 \
        --steps "$VQ_STEPS" --ckpt-every 500 --eval-every 2000
    stage "$dir/prior_top" train-prior "${common[@]}" --vqvae "$dir/vqvae" --level top --lr 3e-4 --warmup 100 \
        --steps "$TOP_STEPS" --ckpt-every 250 --eval-every 1000
    stage "$dir/prior_bottom" train-prior "${common[@]}" --vqvae "$dir/vqvae" --level bottom --lr 3e-4 \
        --warmup 100 --steps "$BOTTOM_STEPS" --ckpt-every 250 --eval-every 1000
    priors=(--prior-top "$dir/prior_top" --prior-bottom "$dir/prior_bottom")
    vqtok evaluate --vqvae "$dir/vqvae" "${priors[@]}" --data "$DATA,photos" --out "$dir/eval"
    vqtok evaluate --vqvae "$dir/vqvae" "${priors[@]}" --data "$SR/bsd100,$SR/urban100,$SR/sun-hays80" \
        --out "$dir/eval_sr"
    vqtok export --vqvae "$dir/vqvae" "${priors[@]}" --eval "$dir/eval/eval.json" --out "$dir/bundle" \
        --name vqtok-default
    echo "round $round: exported $dir/bundle ($(date -u +%FT%TZ))" | tee -a "$RUNS/rounds.log"
    round=$((round + 1))
done
