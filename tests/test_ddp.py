"""DDP on CPU: two gloo processes train a few steps and end with identical weights and codebooks.

Each rank draws its own crops, so the ranks agree only because gradients are all-reduced (DDP) and
the EMA codebook statistics are all-reduced before every update (models.quantizer).
"""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from tests.conftest import random_images

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, data: str, run: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import training.train_vqvae as tv
    from service.cli import main as cli

    original = tv.train

    def train_then_dump(r, *args, **kwargs):
        original(r, *args, **kwargs)
        torch.save({"model": r.model.state_dict(), "crops": int(r.rng.integers(1 << 30))}, Path(out) / f"rank{rank}.pt")

    tv.train = train_then_dump
    cli(["train-vqvae", "--run", run, "--data", data, "--val-fraction", "0.2", "--steps", "6", "--device", "cpu",
         "--threads", "1", "--image-size", "32", "--batch-size", "4", "--channels", "16", "--res-channels", "8",
         "--res-blocks", "1", "--codes", "16", "--embed-dim", "8", "--eval-every", "3", "--log-every", "1"])


@pytest.mark.timeout(300)
def test_two_gloo_ranks_hold_identical_weights_and_codebooks(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    for i, img in enumerate(random_images(12, size=40, seed=2)):
        Image.fromarray(img).save(data / f"img{i}.png")
    run = tmp_path / "run"
    mp.start_processes(worker, args=(free_port(), str(data), str(run), str(tmp_path)), nprocs=WORLD,
                       start_method="spawn", join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    a, b = states[0]["model"], states[1]["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"ranks differ in {key}"
    for level in ("quant_top", "quant_bottom"):
        assert bool(a[f"{level}.initialized"]) and a[f"{level}.cluster_size"].sum() > 0
    assert states[0]["crops"] != states[1]["crops"], "both ranks drew the same crops"
    # Rank 0 alone wrote the run: one checkpoint at step 6 and one line per step in the log.
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 6
    assert all(torch.equal(ckpt["model"][k], a[k]) for k in a)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert sum('"split": "train"' in line for line in lines) == 6
