"""``vqtok tokenize``: a folder job through the in-process service. Bad files are recorded and
skipped, transient refusals are retried, and a rerun resumes instead of starting over."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from conftest import TINY_SIZE, random_images
from service_support import png_bytes, run, serving
from tokenize_support import folder as _folder
from tokenize_support import overloaded
from tokenize_support import read_shards as _shards

from service.bundle import Bundle
from service.client import AsyncClient
from service.jobs.http_job import JobConfig, run_job
from service.jobs.retry import Backoff
from service.jobs.shards import JobAborted, finished_paths
from service.runtime.backend import OrtBackend
from service.runtime.session import RuntimeConfig


@pytest.fixture(scope="module")
def backend(tiny_bundle):
    return OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1))


class FailFirst(httpx.AsyncBaseTransport):
    """Answers the first ``failures`` requests with 503 + Retry-After: 0, then passes them on."""

    def __init__(self, inner: httpx.AsyncBaseTransport, failures: int):
        self.inner, self.failures = inner, failures

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.failures > 0:
            self.failures -= 1
            return overloaded()
        return await self.inner.handle_async_request(request)


class DownAfterFirstSuccess(httpx.AsyncBaseTransport):
    """Passes encode requests on until one succeeds; from then on the service answers 503 for good."""

    def __init__(self, inner: httpx.AsyncBaseTransport):
        self.inner, self.up, self.failed = inner, True, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/encode":  # the job asks /v1/model for the bundle first
            return await self.inner.handle_async_request(request)
        if not self.up:
            self.failed += 1
            return overloaded()
        response = await self.inner.handle_async_request(request)
        self.up = response.status_code != 200
        return response


def test_folder_job_skips_bad_files_retries_and_resumes(tiny_bundle, backend, tmp_path):
    root, out = tmp_path / "images", tmp_path / "codes"
    root.mkdir()
    good = _folder(root)

    async def main():
        async with serving(tiny_bundle, backend) as (app, _):
            asgi = httpx.ASGITransport(app=app)
            # Batches of 3 put the bad files in the same requests as good ones; two 503s come first.
            cfg = JobConfig(root=root, out=out, batch=3, concurrency=2, shard_size=4, backoff=Backoff(first_s=0.0))
            async with AsyncClient("http://test", transport=FailFirst(asgi, failures=2)) as client:
                report = await run_job(client, cfg, progress=False)
            assert (report.encoded, report.failed, report.skipped) == (6, 2, 0)
            assert report.shards == 2  # 6 images, 4 per shard

            paths, top, bottom = _shards(out)
            assert sorted(paths) == sorted([*good, "big.jpg"])
            assert top.dtype == np.uint16 and top.shape[1:] == (TINY_SIZE // 8, TINY_SIZE // 8)
            direct = backend.encode(np.stack([good[p] for p in paths if p in good]))
            rows = [i for i, p in enumerate(paths) if p in good]
            assert (top[rows] == direct["top"]).all() and (bottom[rows] == direct["bottom"]).all()

            errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
            assert {e["path"]: e["code"] for e in errors} == {"corrupt.png": "invalid_image",
                                                                "empty.jpg": "invalid_image"}
            assert all(e["status"] == 400 and e["message"] for e in errors)

            # A rerun finds nothing to do; a new file is all the next run sends.
            async with AsyncClient("http://test", transport=asgi) as client:
                again = await run_job(client, cfg, progress=False)
                assert (again.encoded, again.failed, again.skipped, again.shards) == (0, 0, 8, 0)
                (root / "new.png").write_bytes(png_bytes(random_images(1, seed=99)[0]))
                more = await run_job(client, cfg, progress=False)
            assert (more.encoded, more.failed, more.skipped, more.shards) == (1, 0, 8, 1)
            assert len(finished_paths(out)) == 9 and len(_shards(out)[0]) == 7

    run(main())


def test_a_service_that_stays_down_stops_the_job_and_keeps_what_was_done(tiny_bundle, backend, tmp_path):
    root, out = tmp_path / "images", tmp_path / "codes"
    root.mkdir()
    _folder(root)
    for bad in ("corrupt.png", "empty.jpg"):  # six good images: every batch of two succeeds or fails whole
        (root / bad).unlink()

    async def main():
        async with serving(tiny_bundle, backend) as (app, _):
            asgi = httpx.ASGITransport(app=app)
            cfg = JobConfig(root=root, out=out, batch=2, concurrency=1, retries=2, backoff=Backoff(first_s=0.0))
            down = DownAfterFirstSuccess(asgi)
            async with AsyncClient("http://test", transport=down) as client:
                with pytest.raises(JobAborted, match="kept failing"):
                    await run_job(client, cfg, progress=False)
            assert down.failed == 3  # the first try and two retries
            assert len(_shards(out)[0]) == 2  # the batch done before the outage was written

            async with AsyncClient("http://test", transport=asgi) as client:
                report = await run_job(client, cfg, progress=False)
            assert (report.skipped, report.encoded, report.failed) == (2, 4, 0)
            assert sorted(_shards(out)[0]) == sorted(finished_paths(out)) and len(finished_paths(out)) == 6

    run(main())
