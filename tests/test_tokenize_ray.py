"""``vqtok tokenize`` in its three modes (HTTP, ``--local``, ``--ray``) on one hostile folder: every mode
finishes, the good files get the same codes and sizes, and the bad ones the same (status, code) in
``errors.jsonl``, because all three take images in through ``service.bundle.intake``.

One test (starting Ray takes seconds): a local Ray with 2 CPUs."""
from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from conftest import random_images
from PIL import Image
from service_support import png_bytes, run, serving
from tokenize_support import by_path, errors, settle

from service.bundle import Bundle
from service.client import AsyncClient
from service.jobs.http_job import JobConfig, run_job
from service.jobs.local import LocalConfig, run_local
from service.jobs.ray_job import RayConfig, run_ray
from service.runtime.backend import OrtBackend
from service.runtime.session import RuntimeConfig

ray = pytest.importorskip("ray", reason="the [ray] extra (installed by the dev extra)")

REFUSED = {
    "fake.png": (415, "unsupported_image_format"),  # a PSD saved under an image name
    "truncated.jpg": (400, "invalid_image"),
    "huge.png": (413, "too_many_pixels"),  # 20 MP, over the default 16.8 MP limit
    "empty.jpg": (400, "invalid_image"),
    "notes.jpg": (400, "invalid_image"),  # text
}


def hostile_folder(root) -> list[str]:
    good = []
    for i, im in enumerate(random_images(6, seed=3)):
        big = np.kron(im, np.ones((3, 2, 1), np.uint8))  # not square, larger than the model: resized and cropped
        (root / f"good{i}.jpg").write_bytes(png_bytes(big, format="JPEG", quality=90))
        good.append(f"good{i}.jpg")
    (root / "fake.png").write_bytes(b"8BPS\x00\x01" + b"\x00" * 200)
    whole = (root / "good0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    buf = io.BytesIO()
    Image.new("RGB", (5000, 4000), (30, 60, 90)).save(buf, format="PNG", compress_level=1)
    (root / "huge.png").write_bytes(buf.getvalue())
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image at all\n")
    settle(root)
    return good


def test_three_modes_finish_with_the_same_codes_and_the_same_refusals(tiny_bundle, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    good = hostile_folder(root)

    async def http_job():
        backend = OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1))
        async with (serving(tiny_bundle, backend) as (app, _),
                    AsyncClient("http://test", transport=httpx.ASGITransport(app=app)) as client):
            return await run_job(client, JobConfig(root=root, out=tmp_path / "http", batch=4))

    http = run(http_job())
    local = run_local(LocalConfig(root=root, out=tmp_path / "local", model=tiny_bundle, device="cpu", workers=1))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        cfg = RayConfig(root=root, out=tmp_path / "ray", model=tiny_bundle, device="cpu", batch=4, chunk=2,
                        shard_size=4)
        on_ray = run_ray(cfg)
        again = run_ray(cfg)  # resuming on Ray: nothing left to do
    finally:
        ray.shutdown()

    for report in (http, local, on_ray):
        assert (report.encoded, report.failed, report.deferred) == (len(good), len(REFUSED), 0)
    assert (again.encoded, again.skipped) == (0, len(good) + len(REFUSED))
    for mode in ("http", "local", "ray"):
        assert errors(tmp_path / mode) == REFUSED, mode
    rows = {mode: by_path(tmp_path / mode) for mode in ("http", "local", "ray")}
    assert sorted(rows["http"]) == sorted(rows["local"]) == sorted(rows["ray"]) == sorted(good)
    for path in good:
        for key in ("top", "bottom", "height", "width", "bundle_sha256", "bundle_version"):
            assert np.array_equal(rows["local"][path][key], rows["http"][path][key]), (path, key)
            assert np.array_equal(rows["ray"][path][key], rows["http"][path][key]), (path, key)
        assert (int(rows["http"][path]["height"]), int(rows["http"][path]["width"])) == (96, 64)
