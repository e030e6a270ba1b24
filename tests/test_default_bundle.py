"""The shipped bundle: it verifies, reproduces its own reported held-out PSNR through ONNX
Runtime, serves real photos, and samples with the cached sampler exactly as with the naive one."""
import base64
import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service.bundle import DEFAULT_BUNDLE, Bundle
from service.bundle.sampling import noise_for
from service.runtime.sampler import PriorSampler
from tests.service_support import png_bytes, run, serving

pytestmark = pytest.mark.skipif(not (DEFAULT_BUNDLE / "manifest.json").exists(), reason="no shipped bundle")


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.load(DEFAULT_BUNDLE)


def session(bundle: Bundle, graph: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(bundle.path(graph)), providers=["CPUExecutionProvider"])


def test_manifest_describes_the_default_model(bundle):
    assert bundle.image_size == 64
    assert {n: (lv.stride, lv.codebook_size) for n, lv in bundle.levels.items()} == {
        "top": (8, 512), "bottom": (4, 512)}
    for graph in ("encoder", "decoder", "prior_top", "prior_bottom", "prior_top_row", "prior_top_pixel",
                  "prior_bottom_row", "prior_bottom_pixel"):
        assert bundle.has(graph), graph


def test_onnx_reproduces_the_reported_heldout_psnr(bundle):
    """Recompute the manifest's PSNR on the built-in held-out photos' crops with the exported graphs
    (the figure evaluate reports next to the held-out ImageNet files, which need the data folder)."""
    from service.bundle.images import psnr
    from training.data import PhotoSource

    images = PhotoSource.build(bundle.image_size).heldout()
    enc, dec = session(bundle, "encoder"), session(bundle, "decoder")
    recon = []
    for i in range(0, len(images), 64):
        top, bottom = enc.run(["top", "bottom"], {"images": images[i:i + 64]})
        recon.append(dec.run(None, {"top": top, "bottom": bottom})[0])
    measured = float(psnr(images, np.concatenate(recon)).mean())
    reported = bundle.manifest["metrics"]["photos_heldout_crops"]["psnr"]
    assert measured == pytest.approx(reported, abs=0.05)
    assert measured > 25.0


def test_cached_and_naive_sampling_agree_on_the_default_bundle(bundle):
    sessions = {g: session(bundle, g) for g in ("prior_top", "prior_bottom")}
    n = 2
    noise = noise_for(bundle, seed=3, n=n)
    t, k = np.ones(n, np.float32), np.zeros(n, np.int64)
    cached = PriorSampler(bundle, dict(sessions), method="cached").sample(noise, t, k)
    naive = PriorSampler(bundle, dict(sessions), method="naive").sample(noise, t, k)
    assert cached["top"].shape == (n, 8, 8) and cached["bottom"].shape == (n, 16, 16)
    assert np.array_equal(cached["top"], naive["top"]) and np.array_equal(cached["bottom"], naive["bottom"])


def test_service_encodes_and_reconstructs_a_real_photo(bundle):
    from skimage.data import chelsea  # held out from training

    photo = png_bytes(chelsea())

    async def go():
        async with serving(DEFAULT_BUNDLE) as (_, client):
            r = await client.post("/v1/encode", files=[("images", ("cat.png", photo, "image/png"))])
            assert r.status_code == 200, r.text
            item = r.json()["items"][0]
            assert np.array(item["top"]).shape == (8, 8) and np.array(item["bottom"]).shape == (16, 16)
            r = await client.post("/v1/reconstruct", files=[("images", ("cat.png", photo, "image/png"))])
            assert r.status_code == 200, r.text
            rec = r.json()["items"][0]
            image = Image.open(io.BytesIO(base64.b64decode(rec["image"])))
            assert image.size == (64, 64)
            assert rec["psnr"] > 22.0
    run(go())


def test_bundle_is_the_one_in_the_repository():
    assert DEFAULT_BUNDLE == Path(__file__).resolve().parent.parent / "artifacts" / "default"
