"""A tiny end-to-end run on a temp image folder: train, resume, prior, evaluate, export."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.cli import main as cli
from tests.conftest import random_images
from training.data import is_heldout, make_source, split_source
from training.loop import read_metrics

TINY_MODEL = ["--image-size", "32", "--batch-size", "8", "--channels", "16", "--res-channels", "8",
              "--res-blocks", "1", "--codes", "32", "--embed-dim", "8", "--log-every", "1", "--warmup", "5"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "nested").mkdir()
    for i, img in enumerate(random_images(24, size=48, seed=1)):
        suffix = [".png", ".jpg", ".webp"][i % 3]
        Image.fromarray(img).save(root / ("nested" if i % 2 else ".") / f"img{i}{suffix}")
    (root / "garbage.png").write_bytes(b"this is not an image")
    (root / "empty.jpg").write_bytes(b"")
    png = (root / "img0.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 3])
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return root


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if r["split"] == "train"]


def test_packed_source_skips_corrupt_files_and_reuses_its_cache(image_folder, tmp_path, monkeypatch):
    src = make_source(str(image_folder), 32, val_fraction=0.2, cache_dir=tmp_path)
    assert len(src.train_files) + len(src.heldout_files) == 27
    bad_in_train = {str(p) for p in src.train_files if p.name in {"garbage.png", "empty.jpg", "truncated.png"}}
    assert bad_in_train and set(src.pack.skipped) == bad_in_train and src.skipped == len(bad_in_train)
    assert len(src.pack.files) == len(src.train_files) - len(bad_in_train)
    rng = np.random.default_rng(0)
    for _ in range(10):
        batch = src.sample_batch(rng, 8)
        assert batch.shape == (8, 32, 32, 3) and batch.dtype == np.uint8
    held = src.heldout()
    assert held.shape[1:] == (32, 32, 3)
    # The split is by file and deterministic: no file is on both sides.
    assert not set(src.train_files) & set(src.heldout_files)
    assert all(is_heldout(str(p.relative_to(image_folder)), 0.2) for p in src.heldout_files)
    # Decoded once: a second source reads the pack from the cache (the same pixels, no decoding).
    (cache,) = tmp_path.glob("packed-*")
    assert np.load(cache / "pixels.npy", mmap_mode="r").size == src.pack.pixels.numel()
    monkeypatch.setattr("training.data.load_rgb", lambda path: pytest.fail(f"decoded {path} again"))
    again = make_source(str(image_folder), 32, val_fraction=0.2, cache_dir=tmp_path)
    assert torch.equal(again.pack.pixels, src.pack.pixels) and again.pack.files == src.pack.files
    assert np.array_equal(again.sample_batch(np.random.default_rng(5), 4), src.sample_batch(np.random.default_rng(5), 4))


def test_several_sources_are_packed_together(image_folder, tmp_path):
    src = make_source(f"{image_folder},photos", 32, val_fraction=0.2)
    assert [s.spec for s in src.splits] == [str(image_folder), "photos"]
    assert any(p.name == "astronaut.png" for p in src.train_files)
    assert {"chelsea.png", "coffee.png"} <= {p.name for p in src.heldout_files}
    # Crops span scales: the whole 512 px astronaut shrunk to 32 px down to 32 px of it at full size.
    batch = src.sample_batch(np.random.default_rng(0), 64)
    assert batch.shape == (64, 32, 32, 3) and batch.std() > 10


def test_train_resume_prior_evaluate_export(image_folder, tmp_path):
    data = ["--data", str(image_folder), "--val-fraction", "0.2"]
    full = tmp_path / "full"
    assert cli(["train-vqvae", "--run", str(full), "--steps", "40", "--eval-every", "20", "--data-terms", "test terms",
                *data, *TINY_MODEL]) == 0
    curve = losses(full)
    assert len(curve) == 40
    assert np.mean(curve[-5:]) < np.mean(curve[:5]), "loss did not decrease"

    # Interrupt a second run at step 20 (right after its checkpoint), then resume it: the next
    # losses must be exactly those of the uninterrupted run.
    interrupted = tmp_path / "interrupted"
    from training import loop

    original_save = loop.Run.save
    fired = []

    def save_then_stop(self):
        path = original_save(self)
        if self.step == 20 and not fired:
            fired.append(True)
            raise KeyboardInterrupt  # as Ctrl-C would, right after the step-20 checkpoint
        return path

    loop.Run.save = save_then_stop
    try:
        with pytest.raises(SystemExit):
            cli(["train-vqvae", "--run", str(interrupted), "--steps", "40", "--ckpt-every", "10",
                 "--eval-every", "20", *data, *TINY_MODEL])
    finally:
        loop.Run.save = original_save
    assert len(losses(interrupted)) == 20
    assert cli(["train-vqvae", "--run", str(interrupted), "--resume"]) == 0
    assert losses(interrupted) == curve, "resumed run diverged from the uninterrupted one"

    # A conflicting setting is refused rather than silently applied.
    with pytest.raises(ValueError, match="--lr"):
        cli(["train-vqvae", "--run", str(full), "--resume", "--lr", "0.5"])
    with pytest.raises(FileExistsError):
        cli(["train-vqvae", "--run", str(full), *data])

    prior_args = ["--vqvae", str(full), *data, "--image-size", "32", "--batch-size", "8", "--steps", "6",
                  "--channels", "8", "--layers", "2", "--kernel", "3", "--head-channels", "16",
                  "--log-every", "1", "--eval-every", "3"]
    top, bottom = tmp_path / "prior_top", tmp_path / "prior_bottom"
    assert cli(["train-prior", "--run", str(top), "--level", "top", *prior_args]) == 0
    assert cli(["train-prior", "--run", str(bottom), "--level", "bottom", *prior_args]) == 0
    for run in (full, top, bottom):
        assert (run / "loss_curves.png").is_file()
    assert (top / "samples.png").is_file() and (bottom / "samples.png").is_file()
    assert any(full.glob("reconstructions_*.png")) and (full / "codebook_usage.png").is_file()

    ev = tmp_path / "eval"
    assert cli(["evaluate", "--vqvae", str(full), "--prior-top", str(top), "--prior-bottom", str(bottom),
                "--out", str(ev)]) == 0
    report = json.loads((ev / "eval.json").read_text())
    for name in ("top", "bottom"):
        lv = report["levels"][name]
        assert lv["mutual_information_bits"] + lv["kl_qagg_uniform_bits"] == pytest.approx(5.0)
        assert 0 < lv["prior_bits_per_code"] < 20
    assert report["reconstruction"]["psnr"] > 5
    assert "PSNR" in (ev / "eval.md").read_text()
    # Native size: every readable held-out file, its code length under the priors as the byte budget
    # of JPEG and WebP, file by file.
    native = report["native"]
    assert native["images"] == report["heldout_images"] and native["bits_per_pixel"] > 0
    for row in native["per_image"]:
        assert row["bytes"] == math.ceil(row["bits"] / 8) and row["height"] % 8 == 0 and row["width"] % 8 == 0
        for fmt in ("jpeg", "webp"):
            assert row[fmt]["over_budget"] or row[fmt]["bytes"] <= row["bytes"]
    assert native["jpeg"]["gap_db"] == pytest.approx(native["psnr"] - native["jpeg"]["psnr"])
    assert (ev / "native_comparison.png").is_file() and (ev / "reconstructions.png").is_file()

    bundle = tmp_path / "bundle"
    assert cli(["export", "--vqvae", str(full), "--prior-top", str(top), "--prior-bottom", str(bottom),
                "--out", str(bundle), "--eval", str(ev / "eval.json")]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["code_agreement_bottom"] >= 0.995
    assert manifest["metrics"]["reconstruction"]["psnr"] == report["reconstruction"]["psnr"]
    assert [lv["stride"] for lv in manifest["levels"]] == [8, 4]
    (source,) = manifest["data"]["sources"]
    assert source["terms"] == "test terms"
    assert source["source"] == image_folder.name  # the folder's name, not this machine's path to it
    recorded = json.dumps({k: manifest[k] for k in ("data", "training", "metrics")})
    assert str(image_folder) not in recorded and str(tmp_path) not in recorded
    assert source["heldout_files"] == len(split_source(str(image_folder), 0.2).heldout_files)
    assert "per_image" not in manifest["metrics"]["native"]

    # The bundle's own weights, evaluated on the same held-out files, give the run's figures.
    again = tmp_path / "bundle_eval"
    assert cli(["evaluate", "--bundle", str(bundle), "--data", str(image_folder), "--val-fraction", "0.2",
                "--out", str(again)]) == 0
    rebuilt = json.loads((again / "eval.json").read_text())
    assert rebuilt["reconstruction"]["psnr"] == pytest.approx(report["reconstruction"]["psnr"])
    assert rebuilt["native"]["bits_per_pixel"] == pytest.approx(native["bits_per_pixel"])
