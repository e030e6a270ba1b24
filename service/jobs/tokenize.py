"""``vqtok tokenize``: tokenize a folder of images through a running service, resumably.

    vqtok tokenize DIR --out OUT [--url URL] [--api-key KEY] [--batch 16] [--concurrency 4]

Walks DIR (recursively, in sorted order) for image files and sends them to ``/v1/encode`` in
batches, several batches in flight. The codes go into shards, ``OUT/shard-00000.npz`` and on, each
holding ``paths`` (relative to DIR) and one uint16 [n, h, w] array per level (``top``, ``bottom``). Images are fitted to
the model's size (``fit=center_crop``), so every grid in a shard has the same shape.

One bad file never stops the job: a batch the service refuses because of one file is retried file
by file, and each refused file goes to ``OUT/errors.jsonl`` with the service's error code and
message. A full queue (503) or a timeout is retried after a pause. Failures that are not about a
file (a wrong API key, the service gone for good) stop the job, losing nothing: shards are written
whole (a temporary file, then a rename), and a rerun skips every path already in a shard or in
errors.jsonl, so the job resumes where it stopped.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.bundle.images import IMAGE_SUFFIXES
from service.bundle.wire import to_uint16
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

FILE_ERRORS = (BadRequestError, PayloadTooLargeError, InvalidRequestError)  # about a file: record and go on


@dataclass(frozen=True)
class JobConfig:
    root: Path
    out: Path
    batch: int = 16  # images per request
    concurrency: int = 4  # requests in flight
    shard_size: int = 4096  # images per shard file
    retries: int = 8  # per request, for 503/504/transport errors
    backoff_s: float = 0.5  # first pause between retries; doubles, capped at 30 s


@dataclass
class JobReport:
    encoded: int = 0
    failed: int = 0
    skipped: int = 0  # done by an earlier run
    shards: int = 0


class JobAborted(RuntimeError):
    """A failure that is not about one file; the shards written so far stay valid."""


def list_images(root: Path) -> list[str]:
    """Image files under ``root`` as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _shard_paths(out: Path) -> list[Path]:
    return sorted(out.glob("shard-*.npz"))


def finished_paths(out: Path) -> set[str]:
    """Paths an earlier run encoded (in a complete shard) or recorded as refused."""
    done: set[str] = set()
    for shard in _shard_paths(out):
        with np.load(shard) as data:
            done.update(str(p) for p in data["paths"])
    errors = out / "errors.jsonl"
    if errors.exists():
        for line in errors.read_text().splitlines():
            if line.strip():
                done.add(json.loads(line)["path"])
    return done


class ShardWriter:
    """Collects (path, codes) and writes a shard whenever ``shard_size`` are in, atomically."""

    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size = out, shard_size
        existing = _shard_paths(out)
        self.next_index = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        self.paths: list[str] = []
        self.codes: list[Codes] = []
        self.written = 0

    def add(self, path: str, codes: Codes) -> None:
        self.paths.append(path)
        self.codes.append(codes)
        if len(self.paths) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.paths:
            return
        final = self.out / f"shard-{self.next_index:05d}.npz"
        tmp = final.with_suffix(".tmp.npz")
        levels = {name: to_uint16(np.stack([c[name] for c in self.codes])) for name in self.codes[0]}
        np.savez(tmp, paths=np.array(self.paths), **levels)
        os.replace(tmp, final)  # a shard is there whole or not at all
        self.next_index += 1
        self.written += 1
        self.paths, self.codes = [], []


class ErrorLog:
    def __init__(self, path: Path):
        self.file = path.open("a", encoding="utf-8")

    def add(self, path: str, status: int, code: str, message: str) -> None:
        self.file.write(json.dumps({"path": path, "status": status, "code": code, "message": message}) + "\n")
        self.file.flush()  # the record must survive a crash: a rerun trusts it

    def close(self) -> None:
        self.file.close()


def _batches(paths: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(paths), size):
        yield paths[i:i + size]


async def _encode_with_retries(client: AsyncClient, blobs: list[bytes], cfg: JobConfig) -> list[Codes]:
    pause, last = cfg.backoff_s, None
    for attempt in range(cfg.retries + 1):
        try:
            return await client.encode(blobs)
        except (OverloadedError, DeadlineExceededError, ServerError) as e:
            last = e
        except VqtokError as e:
            if e.status != 0:  # an answer we cannot fix by waiting: a bad file, or a wrong key
                raise
            last = e  # transport error: the service may be restarting
        if attempt < cfg.retries:
            await asyncio.sleep(last.retry_after if last.retry_after is not None else pause)
            pause = min(pause * 2, 30.0)
    raise JobAborted(f"the service kept failing after {cfg.retries} retries: {last}")


async def _encode_paths(client: AsyncClient, cfg: JobConfig, paths: list[str],
                        errors: ErrorLog) -> list[tuple[str, Codes]]:
    """Codes for ``paths``; files that cannot be read or that the service refuses are logged."""
    readable, blobs = [], []
    for path in paths:
        try:
            blobs.append((cfg.root / path).read_bytes())
            readable.append(path)
        except OSError as e:
            errors.add(path, 0, "unreadable_file", str(e))
    if not readable:
        return []
    try:
        return list(zip(readable, await _encode_with_retries(client, blobs, cfg)))
    except FILE_ERRORS as e:
        if len(readable) == 1:
            errors.add(readable[0], e.status, e.code, e.message)
            return []
    # Some file spoiled the batch: one request per file keeps the good ones.
    out = []
    for path in readable:
        out += await _encode_paths(client, cfg, [path], errors)
    return out


async def run_job(client: AsyncClient, cfg: JobConfig, progress_every_s: float = 10.0) -> JobReport:
    cfg.out.mkdir(parents=True, exist_ok=True)
    for leftover in cfg.out.glob("*.tmp.npz"):  # from a run killed mid-write
        leftover.unlink()
    everything = list_images(cfg.root)
    done = finished_paths(cfg.out)
    todo = [p for p in everything if p not in done]
    report = JobReport(skipped=len(everything) - len(todo))
    writer, errors = ShardWriter(cfg.out, cfg.shard_size), ErrorLog(cfg.out / "errors.jsonl")
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for batch in _batches(todo, cfg.batch):
        queue.put_nowait(batch)
    start, last_note = time.monotonic(), time.monotonic()

    async def worker() -> None:
        nonlocal last_note
        while not queue.empty():
            paths = queue.get_nowait()
            encoded = await _encode_paths(client, cfg, paths, errors)
            for path, codes in encoded:
                writer.add(path, codes)
            report.encoded += len(encoded)
            report.failed += len(paths) - len(encoded)
            if progress_every_s and time.monotonic() - last_note >= progress_every_s:
                last_note = time.monotonic()
                rate = report.encoded / (last_note - start)
                print(f"tokenize: {report.encoded + report.failed}/{len(todo)} ({report.failed} refused), "
                      f"{rate:.0f} images/s", flush=True)

    try:
        workers = [asyncio.create_task(worker()) for _ in range(max(1, cfg.concurrency))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
    finally:
        writer.flush()  # whatever was encoded before a stop is kept
        errors.close()
    report.shards = writer.written
    return report


def main(args) -> int:
    cfg = JobConfig(root=args.dir, out=args.out, batch=args.batch, concurrency=args.concurrency,
                    shard_size=args.shard_size)
    if not cfg.root.is_dir():
        raise SystemExit(f"vqtok tokenize: {cfg.root} is not a directory")

    async def go() -> JobReport:
        async with AsyncClient(args.url, api_key=args.api_key) as client:
            return await run_job(client, cfg)

    try:
        report = asyncio.run(go())
    except (JobAborted, VqtokError) as e:
        print(f"vqtok tokenize: stopped: {e}\n  rerun the same command to resume", flush=True)
        return 1
    print(json.dumps({"encoded": report.encoded, "refused": report.failed, "already_done": report.skipped,
                      "shards_written": report.shards, "out": str(cfg.out)}))
    return 0
