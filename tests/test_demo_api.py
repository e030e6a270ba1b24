"""What the demo page needs from the API, in process: ``?bits=true`` (code length under the priors,
checked against PyTorch's cross-entropy), ``?include_input=true`` (the fitted input), and the page
itself served from the package with a CSP that allows nothing from elsewhere."""
from __future__ import annotations

import base64
import io
import math
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import TINY_CODES, random_images, tiny_models
from PIL import Image
from service_support import ROOT, image_files, metric_value, png_bytes, run, serving, without_priors

from service.api.demo import STATIC
from service.bundle import Bundle
from service.bundle.images import psnr
from service.bundle.intake import take
from service.runtime.backend import OrtBackend
from service.runtime.session import RuntimeConfig


@pytest.fixture(scope="module")
def backend(tiny_bundle):
    return OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1))


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_bits_equal_pytorch_cross_entropy_per_level(tiny_bundle, backend):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    images = random_images(3, seed=11)
    # The tiny bundle was exported from exactly these (seeded) models.
    _, prior_top, prior_bottom = tiny_models(0)

    async def main():
        async with serving(tiny_bundle, backend) as (_, c):
            r = await c.post("/v1/encode?bits=true", files=image_files([png_bytes(im) for im in images]))
            assert r.status_code == 200, r.text
            return r.json()["items"]

    items = run(main())
    for item in items:
        top, bottom = (torch.tensor(item[name])[None] for name in ("top", "bottom"))
        with torch.no_grad():
            want = {"top": F.cross_entropy(prior_top(top), top, reduction="sum").item() / math.log(2),
                    "bottom": F.cross_entropy(prior_bottom(bottom, top), bottom, reduction="sum").item() / math.log(2)}
        bits = item["bits"]
        for name, grid in (("top", top), ("bottom", bottom)):
            assert bits["levels"][name]["prior"] == pytest.approx(want[name], rel=1e-5)
            assert bits["levels"][name]["uniform"] == grid.numel() * math.log2(TINY_CODES)
        assert bits["prior"] == pytest.approx(sum(want.values()), rel=1e-5)
        assert bits["uniform"] == sum(v["uniform"] for v in bits["levels"].values())


def test_bits_are_batched_and_do_not_depend_on_batch_mates(tiny_bundle, backend):
    images = random_images(3, seed=12)
    blobs = [png_bytes(im) for im in images]

    async def main():
        async with serving(tiny_bundle, backend) as (_, c):
            together = (await c.post("/v1/encode?bits=true", files=image_files(blobs))).json()["items"]
            metrics = (await c.get("/metrics")).text
            alone = [(await c.post("/v1/encode?bits=1", files=image_files([b]))).json()["items"][0] for b in blobs]
            return together, alone, metrics

    together, alone, metrics = run(main())
    # The three images of one request were scored in one batch of the "bits" batcher.
    assert metric_value(metrics, "vqtok_batch_size_count", op="bits") == 1
    assert metric_value(metrics, "vqtok_batch_size_sum", op="bits") == 3
    for a, b in zip(together, alone):
        assert a["bits"]["prior"] == pytest.approx(b["bits"]["prior"], rel=1e-6)


def test_reconstruct_answers_bits_and_the_fitted_input(tiny_bundle, backend):
    # A non-square photo-sized input: the fit (resize, centre crop) is what the answer must show.
    im = random_images(1, size=96, seed=13)[0][:, :80]
    blob = png_bytes(im)

    async def main():
        async with serving(tiny_bundle, backend) as (app, c):
            rec = (await c.post("/v1/reconstruct?bits=true&include_input=true", files=image_files([blob]))).json()
            enc = (await c.post("/v1/encode?bits=true", files=image_files([blob]))).json()
            plain = (await c.post("/v1/reconstruct", files=image_files([blob]))).json()
            return app.state.vqtok.limits_for(app.state.vqtok.default.bundle), rec["items"][0], enc["items"][0], plain["items"][0]

    limits, rec, enc, plain = run(main())
    fitted = take(blob, "center_crop", limits)[0]
    shown = _pixels(rec["input"])
    assert np.array_equal(shown, fitted)
    assert rec["psnr"] == pytest.approx(float(psnr(shown, _pixels(rec["image"]))), abs=1e-9)
    assert rec["bits"] == enc["bits"]
    assert "bits" not in plain and "input" not in plain and plain["psnr"] == rec["psnr"]


def test_bits_on_a_one_level_bundle(tiny_one_level_bundle):
    async def main():
        async with serving(tiny_one_level_bundle) as (_, c):
            return await c.post("/v1/reconstruct?bits=true", files=image_files([png_bytes(random_images(1)[0])]))

    r = run(main())
    assert r.status_code == 200, r.text
    bits = r.json()["items"][0]["bits"]
    (name,) = Bundle.load(tiny_one_level_bundle).level_names
    assert list(bits["levels"]) == [name]
    assert 0 < bits["prior"] == bits["levels"][name]["prior"]


def test_bits_without_priors_answer_uniform_only(tiny_bundle, tmp_path):
    # The same bundle without its priors: encode still works, prior is null.
    root = without_priors(tiny_bundle, tmp_path / "no_priors")
    assert not Bundle.load(root).can_sample

    async def main():
        async with serving(root) as (_, c):
            return await c.post("/v1/encode?bits=true", files=image_files([png_bytes(random_images(1)[0])]))

    r = run(main())
    assert r.status_code == 200, r.text
    bits = r.json()["items"][0]["bits"]
    assert bits["prior"] is None and all(v["prior"] is None for v in bits["levels"].values())
    assert bits["uniform"] > 0


def test_bad_flags_are_422_and_documented(tiny_bundle, backend):
    async def main():
        async with serving(tiny_bundle, backend) as (_, c):
            bad = await c.post("/v1/reconstruct?include_input=yes", files=image_files([png_bytes(random_images(1)[0])]))
            schema = (await c.get("/openapi.json")).json()
            return bad, schema

    bad, schema = run(main())
    assert bad.status_code == 422
    assert bad.json()["error"]["message"] == "include_input: must be true or false, got 'yes'"
    params = {op: {p["name"]: p for p in schema["paths"][f"/v1/{op}"]["post"]["parameters"]}
              for op in ("encode", "reconstruct")}
    assert params["encode"]["bits"]["schema"] == {"type": "boolean", "default": False}
    assert "include_input" in params["reconstruct"] and "bits" in params["reconstruct"]
    components = schema["components"]["schemas"]
    assert "bits" in components["EncodedItem"]["properties"]
    assert {"bits", "input"} <= set(components["ReconstructedItem"]["properties"])
    assert not any(path.startswith("/demo") for path in schema["paths"])


def test_demo_page_is_served_with_a_same_origin_only_csp(tiny_bundle, backend):
    async def main():
        async with serving(tiny_bundle, backend, api_keys=["k"]) as (_, c):
            page = await c.get("/demo")  # open even with keys set: the page asks for one
            assets = {name: await c.get(f"/demo/static/{name}") for name in ("demo.js", "demo.css")}
            slash = await c.get("/demo/", follow_redirects=False)
            return page, assets, slash

    page, assets, slash = run(main())
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert all(r.status_code == 200 for r in assets.values())
    assert assets["demo.js"].headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert slash.status_code == 308 and slash.headers["location"] == "/demo"
    # Nothing outside this origin is referenced by the shipped files.
    for name in ("demo.html", "demo.js", "demo.css"):
        text = (STATIC / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


def test_wheel_ships_the_demo_page(tmp_path):
    # A non-editable install serves /demo from the package: the static files must be in the wheel.
    # Built from a copy of the sources, so the build leaves nothing in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("service", "models", "training"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True, timeout=240)
    wheel = next(tmp_path.glob("vqtok-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"service/api/static/{n}" for n in ("demo.html", "demo.js", "demo.css")} <= names

