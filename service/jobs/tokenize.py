"""``vqtok tokenize``: tokenize a folder of images, resumably, through a service, in-process, or on Ray.

    vqtok tokenize DIR --out OUT [--url URL] [--api-key KEY]          # through a running service
    vqtok tokenize DIR --out OUT --local [--device auto|cpu|cuda]      # ONNX Runtime in this process
    vqtok tokenize DIR --out OUT --ray [ADDRESS]                       # a Ray Data pipeline

All three write the same output folder (``service.jobs.shards``: npz shards, optional Parquet
twins, errors.jsonl, a lock) with the same codes for the same files, and resume the same way.

This module is the HTTP job. It walks DIR (sorted) and sends batches to ``/v1/encode``, several
in flight. One bad file never stops it: a batch the service refuses because of one file is retried
file by file, and each refused file goes to ``errors.jsonl`` with the service's error code and
message. A full queue (503), a timeout or a transport error is retried with capped exponential
backoff (``Retry-After`` honoured up to the cap). Failures that are not about a file (a wrong API
key, the service gone for good) stop the job, losing nothing.
"""
from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.bundle.images import list_images
from service.client import (
    AsyncClient,
    BadRequestError,
    Codes,
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    PayloadTooLargeError,
    ServerError,
    VqtokError,
)
from service.jobs.files import (
    ReadPolicy,
    Stamp,
    TransientReadError,
    header_size,
    read_file,
    still_settling,
)
from service.jobs.progress import progress_bar
from service.jobs.records import BundleId, Encoded
from service.jobs.retry import Backoff
from service.jobs.shards import BundleMismatch, JobAborted, JobOutput, JobReport, OutputLocked, finished_paths

__all__ = ["JobAborted", "JobConfig", "JobReport", "finished_paths", "main", "run_job"]

FILE_ERRORS = (BadRequestError, PayloadTooLargeError, InvalidRequestError)  # about a file: record and go on
_sleep = asyncio.sleep  # module-level so tests can watch the pauses


@dataclass(frozen=True)
class JobConfig:
    root: Path
    out: Path
    batch: int = 16  # images per request
    concurrency: int = 4  # requests in flight
    shard_size: int = 4096  # images per shard file
    retries: int = 8  # per request, for 503/504/transport errors
    backoff: Backoff = field(default_factory=Backoff)
    read: ReadPolicy = field(default_factory=ReadPolicy)
    parquet: bool = False  # also write Parquet shards


def _batches(paths: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(paths), size):
        yield paths[i:i + size]


async def _with_retries(call, cfg: JobConfig):
    last = None
    for attempt in range(cfg.retries + 1):
        try:
            return await call()
        except (OverloadedError, DeadlineExceededError, ServerError) as e:
            last = e
        except VqtokError as e:
            if e.status != 0:  # an answer we cannot fix by waiting: a bad file, or a wrong key
                raise
            last = e  # transport error: the service may be restarting
        if attempt < cfg.retries:
            await _sleep(cfg.backoff.delay(attempt, last.retry_after))
    raise JobAborted(f"the service kept failing after {cfg.retries} retries: {last}")


async def service_bundle(client: AsyncClient, cfg: JobConfig) -> BundleId:
    """The bundle the service runs, from ``GET /v1/model``: shards record it, resumes check it."""
    info = await _with_retries(client.model, cfg)
    if "sha256" not in info:
        raise JobAborted("the service does not report its bundle's sha256 in /v1/model (an older vqtok?); "
                         "the job records it in every shard, so upgrade the service")
    return BundleId(info["name"], info["sha256"])


async def _read(cfg: JobConfig, path: str, output: JobOutput) -> tuple[bytes, Stamp] | None:
    try:
        return await asyncio.to_thread(read_file, cfg.root / path, cfg.read)
    except TransientReadError as e:
        output.defer(path, str(e))
    except OSError as e:
        output.refuse(path, 0, "unreadable_file", str(e))
    return None


def _encoded(paths: list[str], blobs: list[bytes], codes: list[Codes]) -> Encoded:
    return Encoded(paths, np.array([header_size(b) for b in blobs], np.int32).reshape(-1, 2),
                   {name: np.stack([c[name] for c in codes]) for name in codes[0]} if codes else {})


async def _encode_one(client: AsyncClient, cfg: JobConfig, path: str, output: JobOutput) -> Encoded | None:
    """One file on its own; a refusal of a file that is still being written is retried once it settles."""
    for _ in range(cfg.read.retries + 1):
        got = await _read(cfg, path, output)
        if got is None:
            return None
        blob, stamp = got
        try:
            codes = await _with_retries(functools.partial(client.encode, [blob]), cfg)
            return _encoded([path], [blob], codes)
        except FILE_ERRORS as e:
            if not await asyncio.to_thread(still_settling, cfg.root / path, stamp, cfg.read):
                output.refuse(path, e.status, e.code, e.message)
                return None
    output.defer(path, "kept changing; left for a rerun")
    return None


async def _encode_paths(client: AsyncClient, cfg: JobConfig, paths: list[str], output: JobOutput) -> list[Encoded]:
    """Codes for ``paths``; files that cannot be read or that the service refuses are logged."""
    if len(paths) == 1:
        one = await _encode_one(client, cfg, paths[0], output)
        return [one] if one else []
    readable, blobs = [], []
    for path in paths:
        got = await _read(cfg, path, output)
        if got is not None:
            readable.append(path)
            blobs.append(got[0])
    if not readable:
        return []
    try:
        return [_encoded(readable, blobs, await _with_retries(functools.partial(client.encode, blobs), cfg))]
    except FILE_ERRORS:
        pass
    # Some file spoiled the batch: one request per file keeps the good ones.
    out = []
    for path in readable:
        out += await _encode_paths(client, cfg, [path], output)
    return out


async def run_job(client: AsyncClient, cfg: JobConfig, progress: bool = False) -> JobReport:
    bundle = await service_bundle(client, cfg)
    with JobOutput(cfg.out, bundle, cfg.shard_size, cfg.parquet) as output:
        todo = output.todo(list_images(cfg.root))
        queue: asyncio.Queue[list[str]] = asyncio.Queue()
        for batch in _batches(todo, cfg.batch):
            queue.put_nowait(batch)
        bar = progress_bar(len(todo), progress, "tokenize (http)")

        async def worker() -> None:
            while not queue.empty():
                paths = queue.get_nowait()
                for encoded in await _encode_paths(client, cfg, paths, output):
                    output.add(encoded)
                bar.update(len(paths))

        workers = [asyncio.create_task(worker()) for _ in range(max(1, cfg.concurrency))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            bar.close()
    return output.report


def _finish(report: JobReport, out: Path) -> int:
    print(json.dumps(report.as_json(out)), flush=True)
    if report.deferred:
        print(f"vqtok tokenize: {report.deferred} files could not be read yet (still being written, or too many "
              "open files); rerun the same command to pick them up", flush=True)
        return 3
    return 0


def main(args) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise SystemExit(f"vqtok tokenize: {root} is not a directory")
    try:
        report = _run_in_process(args) if args.local or args.ray is not None else asyncio.run(_run_http(args))
    except (BundleMismatch, OutputLocked) as e:  # nothing to resume: say why and stop
        print(f"vqtok tokenize: {e}", flush=True)
        return 1
    except (JobAborted, VqtokError) as e:
        print(f"vqtok tokenize: stopped: {e}\n  rerun the same command to resume", flush=True)
        return 1
    return _finish(report, args.out)


def _run_in_process(args) -> JobReport:
    """--local or --ray. Imported here: the HTTP job needs neither ONNX Runtime nor Ray."""
    from service.bundle import BundleError
    from service.runtime.session import DeviceUnavailable

    try:
        if args.local:
            from service.jobs.local import LocalConfig, run_local

            return run_local(LocalConfig.from_args(args), progress=True)
        from service.jobs.ray_job import RayConfig, run_ray

        return run_ray(RayConfig.from_args(args), progress=True)
    except (BundleError, DeviceUnavailable) as e:
        raise SystemExit(f"vqtok tokenize: {e}") from None


async def _run_http(args) -> JobReport:
    cfg = JobConfig(root=args.dir, out=args.out, batch=args.batch or JobConfig.batch, concurrency=args.concurrency,
                    shard_size=args.shard_size, parquet=args.parquet)
    async with AsyncClient(args.url, api_key=args.api_key) as client:
        return await run_job(client, cfg, progress=True)
