"""Issue 10 item 14: the folder jobs under crashes, busy disks and busy servers, one test per item.

torn errors.jsonl and corrupt last shards are repaired on resume; transient read errors are
retried (and deferred, never recorded, if they persist); shards record the bundle and a resume
with another one is refused; OUT is locked; backoff is capped and caps Retry-After; a full disk
reports the OS error; shard numbers sort numerically past 99,999."""
from __future__ import annotations

import errno
import json
import os
import shutil
from argparse import Namespace
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import random_images
from service_support import png_bytes, run, serving
from tokenize_support import by_path, errors, folder

from service.bundle import Bundle
from service.bundle.intake import IntakeLimits
from service.client import AsyncClient
from service.jobs import files, http_job, records, tokenize
from service.jobs.http_job import JobConfig, run_job
from service.jobs.local import LocalConfig, run_local
from service.jobs.retry import Backoff
from service.jobs.shards import BundleMismatch, JobOutput, OutputLocked, ShardWriter, WriteFailed, shard_files
from service.runtime.backend import OrtBackend
from service.runtime.session import RuntimeConfig


@pytest.fixture(scope="module")
def backend(tiny_bundle):
    return OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1))


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    folder(root)  # 6 good images, corrupt.png and empty.jpg
    return root


def local(root: Path, out: Path, bundle: Path, **kw):
    return run_local(LocalConfig(root=root, out=out, model=bundle, device="cpu", workers=1, **kw))


def http(bundle: Path, backend, cfg: JobConfig, transport=None):
    async def go():
        async with serving(bundle, backend) as (app, _):
            asgi = httpx.ASGITransport(app=app)
            async with AsyncClient("http://test", transport=transport(asgi) if transport else asgi) as client:
                return await run_job(client, cfg)
    return run(go())


# -- torn errors.jsonl, corrupt last shard --------------------------------------------------------
def test_resume_cuts_a_torn_last_line_of_the_error_log(root, tmp_path, tiny_bundle):
    out = tmp_path / "out"
    local(root, out, tiny_bundle)
    lines = (out / "errors.jsonl").read_text().splitlines()
    assert len(lines) == 2
    (out / "errors.jsonl").write_text(lines[0] + "\n" + lines[1][:17])  # a crash in the middle of a write
    report = local(root, out, tiny_bundle)
    assert (report.encoded, report.failed, report.skipped) == (0, 1, 7)  # the torn record's file was judged again
    records_ = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in records_) == ["corrupt.png", "empty.jpg"]


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_resume_sets_aside_a_corrupt_last_shard_and_redoes_its_images(damage, root, tmp_path, tiny_bundle):
    out = tmp_path / "out"
    local(root, out, tiny_bundle, shard_size=4)
    first = by_path(out)
    last = shard_files(out)[-1]
    data = last.read_bytes()
    last.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    report = local(root, out, tiny_bundle, shard_size=4)
    assert report.set_aside == [last.name + ".corrupt"] and (out / (last.name + ".corrupt")).exists()
    assert (report.encoded, report.failed) == (2, 0)  # the two images of the lost shard, nothing else
    again = by_path(out)
    assert sorted(again) == sorted(first)
    assert all(np.array_equal(again[p]["top"], first[p]["top"]) for p in first)


# -- transient read errors ----------------------------------------------------------------------
def _flaky_reads(monkeypatch, name: str, failures: int, err: int = errno.EMFILE) -> list[int]:
    """``Path.read_bytes`` of ``name`` raises ``err`` the first ``failures`` times."""
    real, calls = Path.read_bytes, [0]

    def read_bytes(self):
        if self.name == name:
            calls[0] += 1
            if calls[0] <= failures:
                raise OSError(err, os.strerror(err), str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(files, "sleep", lambda s: None)
    return calls


def test_too_many_open_files_is_retried_not_recorded(root, tmp_path, tiny_bundle, backend, monkeypatch):
    calls = _flaky_reads(monkeypatch, "img1.png", failures=2)
    cfg = JobConfig(root=root, out=tmp_path / "out", batch=1, backoff=Backoff(first_s=0))  # one read per file
    report = http(tiny_bundle, backend, cfg)
    assert calls[0] == 3 and (report.encoded, report.failed, report.deferred) == (6, 2, 0)
    assert "img1.png" in by_path(tmp_path / "out") and "img1.png" not in errors(tmp_path / "out")
    # The decode pool's loader does the same.
    calls[0] = 0
    loaded = files.load_file(root, "img1.png", IntakeLimits(32), files.ReadPolicy())
    assert loaded.pixels is not None and calls[0] == 3


def test_a_read_error_that_persists_is_deferred_to_the_next_run(root, tmp_path, tiny_bundle, backend, monkeypatch):
    out = tmp_path / "out"
    cfg = JobConfig(root=root, out=out, backoff=Backoff(first_s=0))
    _flaky_reads(monkeypatch, "img1.png", failures=10**6)
    report = http(tiny_bundle, backend, cfg)
    assert (report.encoded, report.failed, report.deferred) == (5, 2, 1)
    assert "img1.png" not in errors(out) and "img1.png" not in by_path(out)
    assert tokenize._finish(report, out) == 3  # the CLI exits 3: rerun to pick it up
    monkeypatch.undo()
    again = http(tiny_bundle, backend, cfg)
    assert (again.encoded, again.skipped, again.deferred) == (1, 7, 0)


def test_a_file_still_being_copied_is_judged_once_it_settles(root, tmp_path, tiny_bundle, backend, monkeypatch):
    whole = png_bytes(random_images(1, seed=5)[0])
    late = root / "late.png"
    late.write_bytes(whole[: len(whole) // 3])  # the copy is a third done (and its mtime is now)
    # corrupt.png and empty.jpg are an hour old (``folder``): refused at once, no waiting
    waits = []

    def copy_finishes(seconds):  # while the job waits for the file to settle, the copy completes
        waits.append(seconds)
        late.write_bytes(whole)

    monkeypatch.setattr(files, "sleep", copy_finishes)
    out = tmp_path / "out"
    report = http(tiny_bundle, backend, JobConfig(root=root, out=out, backoff=Backoff(first_s=0)))
    assert (report.encoded, report.failed) == (7, 2) and "late.png" in by_path(out)
    assert len(waits) == 1 and 0 < waits[0] <= files.ReadPolicy().settle_s
    assert errors(out)["corrupt.png"] == (400, "invalid_image")

    # The local job's loader (run by the decode pool) waits the same way.
    late.write_bytes(whole[: len(whole) // 3])
    waits.clear()
    assert files.load_file(root, "late.png", IntakeLimits(32), files.ReadPolicy()).pixels is not None and len(waits) == 1


# -- the bundle ---------------------------------------------------------------------------------
def _renamed_copy(bundle_dir: Path, dest: Path) -> Path:
    """The same graphs under another name: another manifest, so another sha256."""
    shutil.copytree(bundle_dir, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["name"] = "another"
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_a_resume_with_another_bundle_is_refused(root, tmp_path, tiny_bundle, backend):
    out = tmp_path / "out"
    local(root, out, tiny_bundle)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = _renamed_copy(tiny_bundle, tmp_path / "other")
    with pytest.raises(BundleMismatch, match="another"):
        local(root, out, other)
    # Through the service too: the job reads the bundle's sha256 from /v1/model.
    with pytest.raises(BundleMismatch):
        http(other, OrtBackend(Bundle.load(other), RuntimeConfig(device="cpu", intra_op_threads=1)),
             JobConfig(root=root, out=out))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched

    async def model_info():
        async with serving(tiny_bundle, backend) as (_, client):
            return (await client.get("/v1/model")).json()
    assert run(model_info())["sha256"] == Bundle.load(tiny_bundle).sha256


# -- the lock -----------------------------------------------------------------------------------
def test_a_second_job_on_the_same_output_stops_at_once(root, tmp_path, tiny_bundle):
    out = tmp_path / "out"
    with (JobOutput(out, records.BundleId.of(Bundle.load(tiny_bundle))),
          pytest.raises(OutputLocked, match=f"pid {os.getpid()}")):
        local(root, out, tiny_bundle)
    assert local(root, out, tiny_bundle).encoded == 6  # released on exit


# -- backoff ------------------------------------------------------------------------------------
def test_backoff_is_exponential_capped_and_caps_retry_after(root, tmp_path, tiny_bundle, backend, monkeypatch):
    b = Backoff(first_s=0.5, factor=2.0, cap_s=4.0)
    assert [b.delay(i) for i in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.delay(0, retry_after=3600) == 4.0 and b.delay(5, retry_after=1) == 1.0

    class Busy(httpx.AsyncBaseTransport):
        """Two encode requests get 503 with Retry-After: 3600 (an hour); then the service is back."""

        def __init__(self, inner):
            self.inner, self.left = inner, 2

        async def handle_async_request(self, request):
            if request.url.path == "/v1/encode" and self.left:
                self.left -= 1
                return httpx.Response(503, headers={"Retry-After": "3600"},
                                      json={"error": {"code": "overloaded", "message": "queue full"}})
            return await self.inner.handle_async_request(request)

    pauses = []

    async def sleep(seconds):
        pauses.append(seconds)

    monkeypatch.setattr(http_job, "_sleep", sleep)
    cfg = JobConfig(root=root, out=tmp_path / "out", batch=8, concurrency=1, backoff=Backoff(first_s=0.01, cap_s=0.25))
    report = http(tiny_bundle, backend, cfg, transport=Busy)
    assert pauses == [0.25, 0.25] and report.encoded == 6


# -- a full disk --------------------------------------------------------------------------------
def test_a_full_disk_stops_the_job_with_the_original_error(root, tmp_path, tiny_bundle, monkeypatch, capsys):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(records.os, "fsync", no_space)
    out = tmp_path / "out"
    with pytest.raises(WriteFailed) as stopped:
        local(root, out, tiny_bundle)
    assert isinstance(stopped.value.__cause__, OSError) and stopped.value.__cause__.errno == errno.ENOSPC
    assert sorted(p.name for p in out.iterdir()) == [".lock", "errors.jsonl"]  # no partial shard, no temp file
    # The command line says what the OS said.
    args = Namespace(dir=root, out=out, local=True, ray=None, model=tiny_bundle, device="cpu", batch=None,
                     workers=1, shard_size=4096, parquet=False)
    assert tokenize.main(args) == 1
    said = capsys.readouterr().out
    assert "No space left on device" in said and "shard-000000.npz" in said


# -- shard numbers ------------------------------------------------------------------------------
def test_shard_numbers_sort_numerically_past_99999(root, tmp_path, tiny_bundle):
    out = tmp_path / "out"
    out.mkdir()
    bundle = records.BundleId.of(Bundle.load(tiny_bundle))
    grids = {"top": np.zeros((1, 4, 4), np.int64), "bottom": np.zeros((1, 8, 8), np.int64)}
    writer = ShardWriter(out, 1, bundle, next_index=99_999, parquet=False)
    for path in ("img0.png", "img1.png"):
        writer.add(records.Encoded([path], np.array([[32, 32]]), grids))
    os.replace(out / "shard-099999.npz", out / "shard-99999.npz")  # as an older vqtok (5 digits) named it
    assert [p.name for p in shard_files(out)] == ["shard-99999.npz", "shard-100000.npz"]
    report = local(root, out, tiny_bundle)
    assert (report.skipped, report.encoded, report.shards) == (2, 4, 1)
    assert [p.name for p in shard_files(out)] == ["shard-99999.npz", "shard-100000.npz", "shard-100001.npz"]


def test_resume_restores_the_parquet_twins(root, tmp_path, tiny_bundle):
    """A crash between a shard's Parquet and npz renames leaves an orphan Parquet file; an npz without
    its twin (a crash the other way round, or an earlier run without --parquet) gets one."""
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out"
    local(root, out, tiny_bundle, shard_size=4, parquet=True)
    first, second = shard_files(out)
    kept = pq.read_table(first.with_suffix(".parquet"))
    first.with_suffix(".parquet").unlink()
    shutil.copy(second.with_suffix(".parquet"), out / "shard-000007.parquet")  # no shard-000007.npz
    report = local(root, out, tiny_bundle, shard_size=4, parquet=True)
    assert (report.encoded, report.skipped) == (0, 8)
    assert pq.read_table(first.with_suffix(".parquet")).equals(kept)
    assert not (out / "shard-000007.parquet").exists()
