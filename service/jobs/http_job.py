"""The HTTP folder job: walks DIR (sorted) and sends batches to ``/v1/encode``, several in flight.

One bad file never stops it: a batch the service refuses because of one file is retried file by
file, and each refused file goes to ``errors.jsonl`` with the service's status, code and message.
Whether an answer is about a file is decided by its code alone (``service.bundle.intake.REFUSALS``),
the same codes the local and Ray jobs record. A full queue (503), a timeout or a transport error is
retried with capped exponential backoff (``Retry-After`` honoured up to the cap). Failures that are
not about a file (a wrong API key, the service gone for good) stop the job, losing nothing.
"""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.bundle.images import list_images
from service.client import AsyncClient, Codes, DeadlineExceededError, OverloadedError, ServerError, VqtokError
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
from service.jobs.shards import JobAborted, JobOutput, JobReport

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
    return BundleId(info["name"], info["sha256"], info.get("version", ""))


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
        except VqtokError as e:
            if not e.image_refused:
                raise
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
    except VqtokError as e:
        if not e.image_refused:
            raise
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


