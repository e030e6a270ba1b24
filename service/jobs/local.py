"""``vqtok tokenize DIR --out OUT --local``: the folder job with ONNX Runtime in this process, no HTTP.

A pool of processes reads and decodes the files (``service.jobs.files.load_files``: the service's
own intake, JPEG draft mode and pixel limit included), in chunks, ahead of the encoder; the main process
gathers the pixels into batches and runs the encoder on ``streams`` batches at once, then
hands the codes to the same ``JobOutput`` the HTTP job writes to (shards, errors.jsonl, resume,
lock, bundle check). Decoding and encoding overlap: while a batch is in ONNX Runtime (which
releases the GIL) the pool decodes the next ones.

Defaults follow the hardware. On CPU: one decode process per core, and one single-threaded encoder
stream per core (ONNX Runtime's intra-op threads synchronise after every operator, so independent
single-threaded batches use shared cores better, as the serving benchmark found); batches of 16,
where the model alone is fastest on this CPU (``bench/tokenize.py`` times batches of 8 to 256).
On CUDA: one stream, batches of 512, so the GPU gets large batches while every core decodes.
"""
from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.bundle import DEFAULT_BUNDLE, ENCODER, Bundle
from service.bundle.images import list_images
from service.bundle.intake import IntakeLimits, max_image_pixels
from service.jobs.files import Loaded, ReadPolicy, cpu_count, load_files, stack
from service.jobs.progress import progress_bar
from service.jobs.records import BundleId, Encoded
from service.jobs.shards import JobOutput, JobReport
from service.runtime.session import RuntimeConfig, device_name, open_session, wants_cuda

CPU_BATCH, CUDA_BATCH = 16, 512


@dataclass(frozen=True)
class LocalConfig:
    root: Path
    out: Path
    model: Path = DEFAULT_BUNDLE
    device: str = "auto"  # auto | cpu | cuda
    batch: int = 0  # images per encoder run; 0: CPU_BATCH on CPU, CUDA_BATCH on CUDA
    workers: int = 0  # decode processes; 0: one per core
    streams: int = 0  # encoder batches at once; 0: one per core on CPU, 1 on CUDA
    chunk: int = 32  # files per decode task (amortises the pool's per-task cost)
    shard_size: int = 4096
    parquet: bool = False
    max_pixels: int = field(default_factory=max_image_pixels)  # the service's limit (VQTOK_MAX_IMAGE_PIXELS)
    read: ReadPolicy = field(default_factory=ReadPolicy)

    @classmethod
    def from_args(cls, args) -> LocalConfig:
        return cls(root=Path(args.dir), out=Path(args.out), model=Path(args.model or DEFAULT_BUNDLE),
                   device=args.device, batch=args.batch or 0, workers=args.workers or 0, shard_size=args.shard_size,
                   parquet=args.parquet)


class Encoder:
    """The bundle's encoder graph: uint8 [B, S, S, 3] -> {level: int64 grids}. Thread-safe (ORT ``run`` is)."""

    def __init__(self, bundle: Bundle, device: str = "auto", streams: int = 0):
        cores = cpu_count()
        on_gpu = wants_cuda(RuntimeConfig(device=device))
        self.streams = streams or (1 if on_gpu else cores)
        threads = 0 if on_gpu or self.streams == 1 else max(1, cores // self.streams)
        self.session = open_session(bundle.path(ENCODER), RuntimeConfig(device=device, intra_op_threads=threads))
        self.device = device_name(self.session)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.input = self.session.get_inputs()[0].name
        self.image_size = bundle.image_size

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, {self.input: images})))

    def default_batch(self) -> int:
        return CUDA_BATCH if self.device == "cuda" else CPU_BATCH


def _route(loaded: list[Loaded], output: JobOutput, ready: list[Loaded]) -> int:
    """Decoded files join ``ready``; refusals are recorded, transient failures deferred. Returns how many left."""
    gone = 0
    for x in loaded:
        if x.pixels is not None:
            ready.append(x)
        elif x.refusal is not None:
            output.refuse(x.path, x.refusal.status, x.refusal.code, x.refusal.message)
            gone += 1
        else:
            output.defer(x.path, x.transient or "transient")
            gone += 1
    return gone


def run_local(cfg: LocalConfig, progress: bool = False) -> JobReport:
    bundle = Bundle.load(cfg.model)
    encoder = Encoder(bundle, cfg.device, cfg.streams)
    batch = cfg.batch or encoder.default_batch()
    workers = cfg.workers or cpu_count()
    with JobOutput(cfg.out, BundleId.of(bundle), cfg.shard_size, cfg.parquet) as output:
        todo = output.todo(list_images(cfg.root))
        chunks = iter([todo[i:i + cfg.chunk] for i in range(0, len(todo), cfg.chunk)])
        # Enough decoded work queued to fill every stream's next batch, and no more (memory stays bounded).
        prefetch = max(2 * workers, (encoder.streams + 1) * batch // cfg.chunk + 1)
        # forkserver: workers never inherit ONNX Runtime's threads (fork after threads start can deadlock).
        ctx = multiprocessing.get_context("forkserver")
        limits = IntakeLimits(bundle.image_size, max_pixels=cfg.max_pixels)
        with (ProcessPoolExecutor(workers, mp_context=ctx) as pool, ThreadPoolExecutor(encoder.streams) as streams,
              progress_bar(len(todo), progress, f"tokenize (local, {encoder.device})") as bar):
            decoding: deque[Future[list[Loaded]]] = deque()
            encoding: deque[Future[Encoded]] = deque()
            ready: list[Loaded] = []

            def top_up() -> None:
                while len(decoding) < prefetch and (chunk := next(chunks, None)) is not None:
                    decoding.append(pool.submit(load_files, str(cfg.root), chunk, limits, cfg.read))

            def encode(items: list[Loaded]) -> Encoded:
                return Encoded([x.path for x in items], np.array([x.size for x in items], np.int32),
                               encoder(stack(items, bundle.image_size)))

            top_up()
            while decoding or ready or encoding:
                if decoding:
                    bar.update(_route(decoding.popleft().result(), output, ready))
                    top_up()
                while len(ready) >= batch or (ready and not decoding):
                    encoding.append(streams.submit(encode, ready[:batch]))
                    del ready[:batch]
                # Keep at most one batch waiting per stream; write finished batches in order.
                while encoding and (len(encoding) > encoder.streams or encoding[0].done() or not decoding):
                    done = encoding.popleft().result()
                    output.add(done)
                    bar.update(len(done))
    return output.report
