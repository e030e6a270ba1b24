"""``vqtok tokenize``: tokenize a folder of images, resumably, through a service, in-process, or on Ray.

    vqtok tokenize DIR --out OUT [--url URL] [--api-key KEY]          # through a running service
    vqtok tokenize DIR --out OUT --local [--device auto|cpu|cuda]      # ONNX Runtime in this process
    vqtok tokenize DIR --out OUT --ray [ADDRESS]                       # a Ray Data pipeline

All three write the same output folder (``service.jobs.shards``: npz shards, optional Parquet
twins, errors.jsonl, a lock) with the same codes for the same files, and resume the same way. They
take in images through the same intake (``service.bundle.intake``), so they refuse the same files
with the same status and code. This module only picks the mode: the HTTP job is
``service.jobs.http_job``, the others ``service.jobs.local`` and ``service.jobs.ray_job``.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from service.client import AsyncClient, VqtokError
from service.jobs.http_job import JobConfig, run_job
from service.jobs.shards import BundleMismatch, JobAborted, JobOutput, JobReport, OutputLocked, finished_paths

__all__ = ["JobAborted", "JobConfig", "JobOutput", "JobReport", "finished_paths", "main", "run_job"]


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
    async with AsyncClient(args.url, api_key=args.api_key, model=getattr(args, "served_model", None)) as client:
        return await run_job(client, cfg, progress=True)
