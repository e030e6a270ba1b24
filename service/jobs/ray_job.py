"""``vqtok tokenize DIR --out OUT --ray [ADDRESS]``: the folder job as a Ray Data pipeline (the ``[ray]`` extra).

    paths --map_batches(decode, CPU tasks)--> pixels --map_batches(EncodeActor pool)--> codes --> driver --> shards

- Read and decode: CPU tasks run ``service.jobs.files.load_files`` (the service's preprocessing,
  the same retries for files still being copied) on chunks of paths.
- Encode: an actor pool; each actor holds one ONNX Runtime session of the encoder (one GPU per
  actor when the cluster has GPUs and ``--device`` is not cpu).
- Write: the driver streams the results into the same ``JobOutput`` as the other jobs (shards,
  errors.jsonl, resume, lock, bundle check). Codes are small (640 bytes an image for the default
  bundle), so one writer keeps up with many encoders.

On a cluster every node must see DIR and the bundle at the same path (a shared file system);
OUT is written by the driver only. ``ADDRESS`` is handed to ``ray.init``: ``auto`` joins the
cluster this machine belongs to, ``ray://head:10001`` connects through Ray Client, nothing starts
a local Ray on this machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.bundle import DEFAULT_BUNDLE, Bundle
from service.bundle.images import list_images
from service.bundle.intake import IntakeLimits, max_image_pixels
from service.jobs.files import ReadPolicy, load_files
from service.jobs.local import Encoder
from service.jobs.progress import progress_bar
from service.jobs.records import BundleId, Encoded
from service.jobs.shards import JobOutput, JobReport


@dataclass(frozen=True)
class RayConfig:
    root: Path
    out: Path
    address: str | None = None  # None or "": a local Ray (or the one already initialised)
    model: Path = DEFAULT_BUNDLE
    device: str = "auto"
    batch: int = 256  # images per encoder call
    actors: int = 0  # encoder actors; 0: one per GPU, else 1
    chunk: int = 32  # files per decode task
    shard_size: int = 4096
    parquet: bool = False
    max_pixels: int = field(default_factory=max_image_pixels)  # the service's limit (VQTOK_MAX_IMAGE_PIXELS)
    read: ReadPolicy = field(default_factory=ReadPolicy)

    @classmethod
    def from_args(cls, args) -> RayConfig:
        return cls(root=Path(args.dir), out=Path(args.out), address=args.ray or None,
                   model=Path(args.model or DEFAULT_BUNDLE), device=args.device, batch=args.batch or cls.batch,
                   actors=args.workers or 0, shard_size=args.shard_size, parquet=args.parquet)


def decode_batch(batch: dict[str, np.ndarray], root: str, limits: IntakeLimits,
                 policy: ReadPolicy) -> dict[str, np.ndarray]:
    """Ray task: paths -> pixels (zeros where a file failed) plus each file's outcome."""
    loaded = load_files(root, [str(p) for p in batch["path"]], limits, policy)
    blank = np.zeros((limits.image_size, limits.image_size, 3), np.uint8)
    return {
        "path": batch["path"],
        "pixels": np.stack([x.pixels if x.pixels is not None else blank for x in loaded]),
        "size": np.array([x.size for x in loaded], np.int32).reshape(-1, 2),
        "ok": np.array([x.pixels is not None for x in loaded]),
        "status": np.array([x.refusal.status if x.refusal else 0 for x in loaded], np.int32),
        "code": np.array([x.refusal.code if x.refusal else ("" if x.pixels is not None else "transient")
                          for x in loaded], dtype=object),
        "message": np.array([x.refusal.message if x.refusal else (x.transient or "") for x in loaded], dtype=object),
    }


class EncodeActor:
    """Ray actor: one encoder session, reused for every batch it gets."""

    def __init__(self, model: str, device: str):
        self.encoder = Encoder(Bundle.load(model), device, streams=1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch.pop("ok")
        pixels = batch.pop("pixels")
        codes = self.encoder(np.ascontiguousarray(pixels[ok]))
        for level, grids in codes.items():
            full = np.zeros((len(ok), *grids.shape[1:]), np.uint16)
            full[ok] = grids
            batch[f"level:{level}"] = full
        batch["ok"] = ok
        return batch


def _route(batch: dict[str, np.ndarray], output: JobOutput) -> int:
    ok = batch["ok"]
    paths = [str(p) for p in batch["path"]]
    for i in np.flatnonzero(~ok):
        if batch["code"][i] == "transient":
            output.defer(paths[i], str(batch["message"][i]))
        else:
            output.refuse(paths[i], int(batch["status"][i]), str(batch["code"][i]), str(batch["message"][i]))
    if ok.any():
        levels = {k.split(":", 1)[1]: v[ok] for k, v in batch.items() if k.startswith("level:")}
        output.add(Encoded([p for p, good in zip(paths, ok) if good], batch["size"][ok], levels))
    return len(paths)


def run_ray(cfg: RayConfig, progress: bool = False) -> JobReport:
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise SystemExit(f"--ray needs Ray: pip install 'vqtok[ray]' ({e})") from None
    if not ray.is_initialized():
        ray.init(address=cfg.address or None, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images
    gpus = int(ray.cluster_resources().get("GPU", 0)) if cfg.device != "cpu" else 0
    actors = cfg.actors or max(1, gpus)
    bundle = Bundle.load(cfg.model)
    root, model = str(Path(cfg.root).resolve()), str(Path(cfg.model).resolve())
    with JobOutput(cfg.out, BundleId.of(bundle), cfg.shard_size, cfg.parquet) as output:
        todo = output.todo(list_images(cfg.root))
        if not todo:
            return output.report
        ds = (ray.data.from_items([{"path": p} for p in todo])
              .map_batches(decode_batch, batch_size=cfg.chunk, batch_format="numpy",
                           fn_kwargs={"root": root, "policy": cfg.read,
                                      "limits": IntakeLimits(bundle.image_size, max_pixels=cfg.max_pixels)})
              .map_batches(EncodeActor, batch_size=cfg.batch, batch_format="numpy",
                           fn_constructor_kwargs={"model": model, "device": cfg.device},
                           compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if gpus else 0))
        with progress_bar(len(todo), progress, f"tokenize (ray, {actors} encoder actors)") as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(_route(batch, output))
    return output.report
