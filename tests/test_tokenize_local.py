"""``vqtok tokenize --local``: ONNX Runtime in-process, decoding in a process pool. It must give the
HTTP job's codes, sizes and refusals for the same folder, resume the same way, and write Parquet
shards that read back as the README shows."""
from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_support import png_bytes, run, serving
from tokenize_support import by_path, errors, folder

from service.bundle import Bundle
from service.client import AsyncClient
from service.jobs.http_job import JobConfig, run_job
from service.jobs.local import LocalConfig, run_local
from service.jobs.retry import Backoff
from service.runtime.backend import OrtBackend
from service.runtime.session import RuntimeConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def backend(tiny_bundle):
    return OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    good = folder(root)
    # A portrait JPEG whose EXIF says "rotate 90°": both jobs must store its size as displayed.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.kron(good["img0.png"], np.ones((2, 1, 1), np.uint8))).save(root / "rotated.jpg", exif=exif)
    return root, good


@pytest.fixture(scope="module")
def local_out(tiny_bundle, images, tmp_path_factory):
    """One local run with Parquet twins; batches of 3 and shards of 4 so both split."""
    out = tmp_path_factory.mktemp("local") / "codes"
    cfg = LocalConfig(root=images[0], out=out, model=tiny_bundle, device="cpu", batch=3, workers=2, chunk=2,
                      shard_size=4, parquet=True)
    report = run_local(cfg, progress=True)
    assert (report.encoded, report.failed, report.skipped, report.deferred) == (7, 2, 0, 0)
    assert report.shards == 2
    return out, cfg


def test_local_job_gives_the_http_jobs_codes_sizes_and_refusals(tiny_bundle, backend, images, local_out, tmp_path):
    root, good = images
    out_local, cfg = local_out
    out_http = tmp_path / "http"

    async def http_job():
        async with (serving(tiny_bundle, backend) as (app, _),
                    AsyncClient("http://test", transport=httpx.ASGITransport(app=app)) as client):
            return await run_job(client, JobConfig(root=root, out=out_http, batch=4, backoff=Backoff(first_s=0)))

    assert run(http_job()).encoded == 7
    local, http = by_path(out_local), by_path(out_http)
    assert sorted(local) == sorted(http) == sorted([*good, "big.jpg", "rotated.jpg"])
    for path, row in local.items():
        for key in ("top", "bottom", "height", "width", "bundle_name", "bundle_sha256"):
            assert np.array_equal(row[key], http[path][key]), (path, key)
        assert row["top"].dtype == np.uint16
    assert errors(out_local) == errors(out_http) == {"corrupt.png": (400, "invalid_image"),
                                                      "empty.jpg": (400, "invalid_image")}
    # The codes are the model's for the exact pixels (PNGs at the model size need no resizing).
    direct = backend.encode(np.stack(list(good.values())))
    for i, path in enumerate(good):
        assert (local[path]["top"] == direct["top"][i]).all() and (local[path]["bottom"] == direct["bottom"][i]).all()
    size = good["img0.png"].shape[0]
    assert (local["rotated.jpg"]["height"], local["rotated.jpg"]["width"]) == (size, 2 * size)  # as displayed
    assert (local["big.jpg"]["height"], local["big.jpg"]["width"]) == (2 * size, 2 * size)
    bundle = Bundle.load(tiny_bundle)
    assert str(local["img0.png"]["bundle_name"]) == bundle.name
    assert str(local["img0.png"]["bundle_sha256"]) == bundle.sha256

    # Resume: nothing left; one new file is all the next run does.
    again = run_local(cfg)
    assert (again.encoded, again.failed, again.skipped, again.shards) == (0, 0, 9, 0)
    (root / "new.png").write_bytes(png_bytes(good["img1.png"][::-1].copy()))
    try:
        more = run_local(cfg)
        assert (more.encoded, more.skipped, more.shards) == (1, 9, 1)
        assert len(by_path(out_local)) == 8
    finally:
        (root / "new.png").unlink()


def _readme_snippet() -> str:
    """The Python block of the README that reads Parquet shards back."""
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "pq.read_table" in b]
    assert len(blocks) == 1, "the README shows one Parquet read-back snippet"
    return blocks[0]


def test_the_readme_parquet_snippet_reads_what_the_npz_shards_hold(local_out, tiny_bundle):
    out, _ = local_out
    namespace: dict = {}
    exec(_readme_snippet().replace('"OUT"', repr(str(out))), namespace)  # noqa: S102 - our own README
    npz = by_path(out)
    paths = list(namespace["paths"])
    assert sorted(paths) == sorted(npz)
    for level in ("top", "bottom"):
        grids = namespace["codes"][level]
        assert grids.dtype == np.uint16 and grids.shape[0] == len(paths)
        assert all(np.array_equal(grids[i], npz[p][level]) for i, p in enumerate(paths))
    assert list(namespace["sizes"][:, 0]) == [int(npz[p]["height"]) for p in paths]
    assert set(namespace["bundles"]) == {(Bundle.load(tiny_bundle).name, Bundle.load(tiny_bundle).sha256)}


def test_the_command_line_runs_the_local_job(tiny_bundle, images, tmp_path, capsys):
    from service.cli import main

    out = tmp_path / "cli"
    argv = ["tokenize", str(images[0]), "--out", str(out), "--local", "--model", str(tiny_bundle), "--device", "cpu",
            "--workers", "1", "--batch", "4", "--parquet"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["encoded"], summary["refused"], summary["deferred"]) == (7, 2, 0)
    assert (out / "shard-000000.npz").exists() and (out / "shard-000000.parquet").exists()
    assert main(argv) == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["already_done"] == 9
