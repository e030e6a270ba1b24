"""Fast cached sampling (issue 4): teacher-forcing parity of the cached steppers (torch and ONNX
Runtime) and identical codes from the naive and cached samplers for the same noise."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_CODES, tiny_models

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from models import GatedPixelCNN, PixelCNNConfig
from service.bundle import Bundle
from service.bundle.sampling import gumbel_noise, noise_for, pick_codes
from service.runtime.sampler import PriorSampler, teacher_forcing
from service.runtime.session import open_session
from training.export_steps import export_step_graphs
from training.fast_sampling import (
    sample_cached_torch,
    sample_naive_torch,
    sample_torch,
    teacher_forcing_logits,
)

TOL = 1e-4
ROOT = Path(__file__).resolve().parent.parent


def big_prior(cond: bool, kernel: int = 5, layers: int = 4, seed: int = 0) -> GatedPixelCNN:
    """Beyond the tiny config: kernel 5 (p = 2), several layers, optionally conditioned."""
    torch.manual_seed(seed)
    prior = GatedPixelCNN(PixelCNNConfig(num_codes=TINY_CODES, channels=8, layers=layers, kernel=kernel,
                                         head_channels=16, cond_codes=TINY_CODES if cond else 0)).eval()
    with torch.no_grad():  # larger, non-zero weights and biases everywhere, so a misplaced zero shows
        for p in prior.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return prior


def priors_under_test():
    _, top, bottom = tiny_models()
    return {"tiny_top": (top, None), "tiny_bottom": (bottom, (3, 4)),
            "k5_top": (big_prior(False), None), "k5_bottom": (big_prior(True, layers=3), (3, 4)),
            "k7_top": (big_prior(False, kernel=7, layers=3), None)}


def random_grids(prior, cond_grid, n=2, grid=(6, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, prior.config.num_codes, (n, *grid), generator=g)
    cond = None
    if cond_grid is not None:
        cond = torch.randint(0, prior.config.cond_codes, (n, *cond_grid), generator=g)
    return codes, cond


@pytest.fixture(scope="module")
def priors():
    return priors_under_test()


# -- teacher forcing --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny_top", "tiny_bottom", "k5_top", "k5_bottom", "k7_top"])
def test_torch_teacher_forcing(priors, name):
    prior, cond_grid = priors[name]
    codes, cond = random_grids(prior, cond_grid)
    with torch.no_grad():
        full = prior(codes, cond)
    cached = teacher_forcing_logits(prior, codes, cond)
    assert full.shape == cached.shape
    assert (full - cached).abs().max().item() < TOL


def test_cached_logits_ignore_future_codes(priors):
    """The stepper's logits at (i, j) must not change when codes at or after (i, j) change."""
    prior, cond_grid = priors["k5_bottom"]
    codes, cond = random_grids(prior, cond_grid, n=1)
    base = teacher_forcing_logits(prior, codes, cond)
    i, j = 2, 3
    changed = codes.clone()
    changed[0, i, j:] = (changed[0, i, j:] + 1) % prior.config.num_codes
    changed[0, i + 1:] = (changed[0, i + 1:] + 1) % prior.config.num_codes
    assert torch.equal(teacher_forcing_logits(prior, changed, cond)[0, :, i, j], base[0, :, i, j])


@pytest.mark.parametrize("name", ["tiny_top", "tiny_bottom", "k5_top", "k5_bottom"])
def test_onnx_teacher_forcing(priors, name, tmp_path):
    prior, cond_grid = priors[name]
    codes, cond = random_grids(prior, cond_grid, n=3, grid=(6, 8))
    files, info = export_step_graphs(prior, tmp_path, "p", grid=(4, 4))  # dynamic: traced 4x4, run 6x8
    sessions = {g: open_session(p) for g, p in files.items()}
    with torch.no_grad():
        full = prior(codes, cond).numpy()
    got = teacher_forcing(sessions, info, codes.numpy(), None if cond is None else cond.numpy())
    assert np.abs(full - got).max() < TOL


def test_bundle_step_graphs_and_parity(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    manifest = bundle.manifest
    for level in ("top", "bottom"):
        info = manifest["sampling"][level]
        for graph in (info["row"], info["pixel"]) + ((info["cond"],) if info["cond"] else ()):
            assert bundle.has(graph) and bundle.path(graph).is_file()
        assert manifest["parity"][f"prior_{level}_step_max_logit_diff"] < TOL
    assert manifest["sampling"]["bottom"]["cond"] == "prior_bottom_cond"
    assert manifest["sampling"]["top"]["cond"] is None


def test_bundle_step_graphs_match_full_graph(tiny_bundle):
    """ORT step graphs vs the bundle's own full-forward ORT graphs, on random codes at every position."""
    bundle = Bundle.load(tiny_bundle)
    sessions = {g: open_session(bundle.path(g)) for g in bundle.manifest["files"]}
    rng = np.random.default_rng(0)
    size = bundle.image_size
    top = rng.integers(0, TINY_CODES, (3, *bundle.levels["top"].grid(size, size)))
    bottom = rng.integers(0, TINY_CODES, (3, *bundle.levels["bottom"].grid(size, size)))
    full_top = sessions["prior_top"].run(None, {"top": top})[0]
    full_bottom = sessions["prior_bottom"].run(None, {"bottom": bottom, "top": top})[0]
    step_top = teacher_forcing(sessions, bundle.manifest["sampling"]["top"], top)
    step_bottom = teacher_forcing(sessions, bundle.manifest["sampling"]["bottom"], bottom, top)
    assert np.abs(full_top - step_top).max() < TOL
    assert np.abs(full_bottom - step_bottom).max() < TOL


# -- same seed, same codes ----------------------------------------------------------------------
def settings(n, temperature=1.0, top_k=0):
    return np.full(n, temperature, dtype=np.float32), np.full(n, top_k, dtype=np.int64)


@pytest.mark.parametrize("name", ["tiny_top", "tiny_bottom", "k5_bottom"])
def test_torch_naive_equals_cached(priors, name):
    prior, cond_grid = priors[name]
    _, cond = random_grids(prior, cond_grid, n=3, grid=(6, 8))
    noise = gumbel_noise(7, 3, 6, 8, TINY_CODES)
    t, k = np.array([1.0, 0.7, 2.0], np.float32), np.array([0, 5, 0], np.int64)
    naive = sample_naive_torch(prior, noise, t, k, cond)
    cached = sample_cached_torch(prior, noise, t, k, cond)
    np.testing.assert_array_equal(naive, cached)
    assert len(np.unique(cached)) > 3  # really sampled, not a constant grid


def test_torch_two_level_sampling_matches():
    _, top_prior, bottom_prior = tiny_models()
    nt, nb = gumbel_noise(3, 2, 4, 4, TINY_CODES), gumbel_noise([3, 1], 2, 8, 8, TINY_CODES)
    t, k = settings(2)
    priors = {"top": top_prior, "bottom": bottom_prior}
    naive = sample_torch(priors, {"top": nt, "bottom": nb}, t, k, "naive")
    cached = sample_torch(priors, {"top": nt, "bottom": nb}, t, k, "cached")
    assert list(naive) == ["top", "bottom"]
    for level in naive:
        np.testing.assert_array_equal(naive[level], cached[level])


@pytest.mark.parametrize("io_binding", [False, True])
def test_onnx_naive_equals_cached(tiny_bundle, io_binding):
    bundle = Bundle.load(tiny_bundle)
    n = 4
    noise = noise_for(bundle, 11, n)
    t = np.array([1.0, 0.5, 3.0, 1.0], np.float32)
    k = np.array([0, 0, 4, 1], np.int64)
    sessions: dict = {}
    naive = PriorSampler(bundle, sessions, "naive").sample(noise, t, k)
    cached = PriorSampler(bundle, sessions, "cached", io_binding=io_binding).sample(noise, t, k)
    assert naive["top"].shape == (n, 4, 4) and naive["bottom"].shape == (n, 8, 8)
    assert naive["top"].dtype == np.int64 and naive["bottom"].dtype == np.int64
    for level in naive:
        np.testing.assert_array_equal(naive[level], cached[level])


def test_onnx_codes_match_torch(tiny_bundle):
    """The ONNX samplers and the torch samplers give the same codes for the same noise."""
    _, top_prior, bottom_prior = tiny_models()  # the tiny bundle was exported from these (seed 0)
    bundle = Bundle.load(tiny_bundle)
    noise = noise_for(bundle, 5, 2)
    t, k = settings(2)
    onnx_codes = PriorSampler(bundle, {}, "cached").sample(noise, t, k)
    torch_codes = sample_torch({"top": top_prior, "bottom": bottom_prior}, noise, t, k, "cached")
    for level in bundle.level_names:
        np.testing.assert_array_equal(onnx_codes[level], torch_codes[level])


def test_same_seed_same_codes_different_seed_different_codes(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    sampler = PriorSampler(bundle, {}, "cached")
    t, k = settings(2)
    a = sampler.sample(noise_for(bundle, 1, 2), t, k)
    b = sampler.sample(noise_for(bundle, 1, 2), t, k)
    c = sampler.sample(noise_for(bundle, 2, 2), t, k)
    np.testing.assert_array_equal(a["bottom"], b["bottom"])
    assert not np.array_equal(a["bottom"], c["bottom"])


# -- temperature and top-k ----------------------------------------------------------------------
def test_gumbel_noise_is_seeded():
    a, b = gumbel_noise(3, 2, 3, 4, 5), gumbel_noise(3, 2, 3, 4, 5)
    assert a.dtype == np.float32 and a.shape == (2, 3, 4, 5) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, gumbel_noise(4, 2, 3, 4, 5))
    assert abs(float(a.mean()) - 0.5772) < 0.5  # Euler-Mascheroni, loosely


def test_pick_codes_temperature_and_top_k():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    noise = gumbel_noise(0, 6, 1, 1, 50)[:, 0, 0]
    argmax = logits.argmax(1)
    np.testing.assert_array_equal(pick_codes(logits, noise, np.full(6, 1e-4, np.float32), np.zeros(6, np.int64)),
                                  argmax)
    np.testing.assert_array_equal(pick_codes(logits, noise, np.zeros(6, np.float32), np.zeros(6, np.int64)), argmax)
    np.testing.assert_array_equal(pick_codes(logits, noise, np.full(6, 5.0, np.float32), np.ones(6, np.int64)),
                                  argmax)
    ks = np.array([1, 2, 3, 10, 0, 50])
    for seed in range(20):
        noise = gumbel_noise(seed, 6, 1, 1, 50)[:, 0, 0]
        codes = pick_codes(logits, noise, np.full(6, 50.0, np.float32), ks)
        ranks = (logits > logits[np.arange(6), codes][:, None]).sum(1)
        assert (ranks[:4] < ks[:4]).all()


def test_temperature_to_zero_is_argmax(tiny_bundle):
    """Greedy decoding: every sampled code is the argmax of the prior's logits given the codes before it."""
    bundle = Bundle.load(tiny_bundle)
    sessions: dict = {}
    sampler = PriorSampler(bundle, sessions, "cached")
    noise = noise_for(bundle, 0, 3)
    _, k = settings(3)
    greedy = sampler.sample(noise, np.zeros(3, np.float32), k)
    cold = sampler.sample(noise, np.full(3, 1e-4, np.float32), k)
    for level in greedy:
        np.testing.assert_array_equal(greedy[level], cold[level])
    top, bottom = greedy["top"], greedy["bottom"]
    full_top = ort.InferenceSession(str(bundle.path("prior_top")), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(full_top.run(None, {"top": top})[0].argmax(1), top)
    full_bottom = ort.InferenceSession(str(bundle.path("prior_bottom")), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(full_bottom.run(None, {"bottom": bottom, "top": top})[0].argmax(1), bottom)


def test_top_k_never_outside_top_k(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    n, kk = 4, 3
    codes = PriorSampler(bundle, {}, "cached").sample(noise_for(bundle, 9, n),
                                                      np.full(n, 20.0, np.float32), np.full(n, kk, np.int64))
    top, bottom = codes["top"], codes["bottom"]
    full_top = ort.InferenceSession(str(bundle.path("prior_top")), providers=["CPUExecutionProvider"])
    full_bottom = ort.InferenceSession(str(bundle.path("prior_bottom")), providers=["CPUExecutionProvider"])
    for codes, logits in ((top, full_top.run(None, {"top": top})[0]),
                          (bottom, full_bottom.run(None, {"bottom": bottom, "top": top})[0])):
        chosen = np.take_along_axis(logits, codes[:, None], 1)
        ranks = (logits > chosen).sum(1)  # how many codes have a larger logit
        assert ranks.max() < kk
        assert ranks.max() > 0  # hot enough that the restriction mattered


def test_bundle_without_step_graphs(tiny_bundle):
    """Bundles exported before issue 4: the naive sampler works, the cached one says what is missing."""
    from service.bundle import BundleError
    from service.bundle.sampling import has_cached_graphs

    bundle = Bundle.load(tiny_bundle)
    assert has_cached_graphs(bundle)
    manifest = {k: v for k, v in bundle.manifest.items() if k != "sampling"}
    old = Bundle(bundle.root, manifest)
    assert not has_cached_graphs(old)
    with pytest.raises(BundleError, match="naive"):
        PriorSampler(old, {}, "cached")
    codes = PriorSampler(old, {}, "naive").sample(noise_for(old, 0, 1), 1.0, 0)  # scalars broadcast
    assert codes["bottom"].shape == (1, 8, 8)


def test_noise_shape_is_checked(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    noise = noise_for(bundle, 0, 2)
    noise["top"] = noise["top"][:, :2]
    with pytest.raises(ValueError, match="shape"):
        PriorSampler(bundle, {}, "cached").sample(noise, *settings(2))


# -- no torch in the service; CLI and bench -----------------------------------------------------
def test_service_sampling_does_not_import_torch():
    code = ("import sys; sys.modules['torch'] = None; "
            "import service.runtime.sampler, service.cli, service.jobs.sample; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


@pytest.mark.parametrize("sampler", ["cached", "naive"])
def test_sample_cli(tiny_bundle, tmp_path, capsys, sampler):
    from PIL import Image

    from service.jobs.sample import main

    out = tmp_path / "grid.png"
    args = argparse.Namespace(model=tiny_bundle, n=3, seed=4, temperature=1.0, top_k=5, sampler=sampler, out=out,
                              device="cpu", threads=1)
    assert main(args) == 0
    printed = capsys.readouterr().out
    codes = np.load(tmp_path / "grid.npz")
    assert codes["top"].shape == (3, 4, 4) and codes["bottom"].shape == (3, 8, 8)
    assert str(tmp_path / "grid.npz") in printed and "timing" in printed
    assert Image.open(out).size[0] > 32


def test_sample_cli_samplers_agree(tiny_bundle, tmp_path):
    from service.cli import main as cli

    for sampler in ("cached", "naive"):  # through the command line, which hands over to service.jobs.sample
        assert cli(["sample", "--model", str(tiny_bundle), "--n", "2", "--seed", "8", "--sampler", sampler,
                    "--out", str(tmp_path / f"{sampler}.png"), "--threads", "1"]) == 0
    a, b = np.load(tmp_path / "cached.npz"), np.load(tmp_path / "naive.npz")
    np.testing.assert_array_equal(a["top"], b["top"])
    np.testing.assert_array_equal(a["bottom"], b["bottom"])


def test_bench_runs_on_tiny_bundle(tiny_bundle, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import sampling as bench  # bench/sampling.py
    finally:
        sys.path.remove(str(ROOT / "bench"))
    out = tmp_path / "sampling.json"
    assert bench.main(["--model", str(tiny_bundle), "--ns", "1", "2", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["n"] for r in report["results"]] == [1, 2]
    assert all(r["identical_codes"] for r in report["results"])
