"""The inference backend: ONNX Runtime sessions behind a small interface.

Everything here is synchronous and array-in, array-out; batchers call it from their own thread.
The ``Backend`` protocol is what the rest of the service sees, so tests can wrap or replace it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnxruntime as ort

from service.bundle import Bundle, BundleError
from service.config import CUDA
from service.sampling import PriorSampler

log = logging.getLogger("vqtok.service")

CPU = "CPUExecutionProvider"


class Backend(Protocol):
    bundle: Bundle
    provider: str

    @property
    def can_sample(self) -> bool: ...

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [B, H, W, 3] -> {level: int64 [B, H/stride, W/stride]}."""

    def decode(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        """{level: int64 grids} -> uint8 [B, H, W, 3]."""

    def sample(self, noise_top: np.ndarray | None, noise_bottom: np.ndarray, temperature: np.ndarray,
               top_k: np.ndarray) -> dict[str, np.ndarray]:
        """Per-sample noise/temperature/top_k -> {level: int64 code grids}."""

    def warmup(self) -> None:
        """Run every graph once so the first request does not pay for allocation and kernel choice."""


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    spinning: bool = False
    sampler: str = "cached"
    warmup_batch: int = 1


class DeviceUnavailable(RuntimeError):
    """``device=cuda`` was asked for but the CUDA execution provider does not load."""


def session_options(cfg: RuntimeConfig) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = cfg.intra_op_threads
    opts.inter_op_num_threads = cfg.inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning keeps idle threads hot between batches; on a shared CPU it steals cycles from others.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg.spinning else "0")
    opts.log_severity_level = 3
    return opts


def open_session(path: str, cfg: RuntimeConfig, opts: ort.SessionOptions) -> ort.InferenceSession:
    """A session on CUDA when it really loads (ORT silently falls back to CPU otherwise), else CPU."""
    want_cuda = cfg.device in ("auto", "cuda") and CUDA in ort.get_available_providers()
    if cfg.device == "cuda" and not want_cuda:
        raise DeviceUnavailable(f"device=cuda but onnxruntime offers only {ort.get_available_providers()}")
    if want_cuda:
        try:
            sess = ort.InferenceSession(path, sess_options=opts, providers=[
                (CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), CPU])
            if sess.get_providers()[0] == CUDA:
                return sess
            reason = "it fell back to CPU"
        except Exception as e:  # noqa: BLE001 - a broken CUDA install raises anything
            reason = str(e)
        if cfg.device == "cuda":
            raise DeviceUnavailable(f"device=cuda but the CUDA execution provider did not load: {reason}")
        log.warning("CUDA execution provider did not load (%s); using CPU", reason)
    return ort.InferenceSession(path, sess_options=opts, providers=[CPU])


class OrtBackend:
    """ONNX Runtime sessions for every graph the bundle lists (verified by ``Bundle.load``)."""

    def __init__(self, bundle: Bundle, cfg: RuntimeConfig):
        self.bundle, self.cfg = bundle, cfg
        opts = session_options(cfg)
        self.sessions: dict[str, ort.InferenceSession] = {}
        for graph, entry in bundle.manifest["files"].items():
            if not str(entry["path"]).endswith(".onnx"):
                continue
            try:
                self.sessions[graph] = open_session(str(bundle.path(graph)), cfg, opts)
            except DeviceUnavailable:
                raise
            except Exception as e:
                raise BundleError(f"bundle file {entry['path']} ({graph}) does not load in ONNX Runtime: {e}") from e
            if cfg.device == "auto" and graph == "encoder" and self.sessions[graph].get_providers()[0] != CUDA:
                cfg = RuntimeConfig(**{**cfg.__dict__, "device": "cpu"})  # don't retry CUDA for every graph
        for graph in ("encoder", "decoder"):
            if graph not in self.sessions:
                raise BundleError(f"bundle {bundle.root} has no {graph} graph")
        self.provider = self.sessions["encoder"].get_providers()[0]
        self.levels = [lv["name"] for lv in bundle.manifest["levels"]]
        self._enc_out = [o.name for o in self.sessions["encoder"].get_outputs()]
        self._dec_in = [i.name for i in self.sessions["decoder"].get_inputs()]
        self.sampler: PriorSampler | None = None
        if all(self.bundle.has(f"prior_{lv}") for lv in self.levels):
            try:
                self.sampler = PriorSampler(bundle, self.sessions, method=cfg.sampler)
            except BundleError as e:
                log.warning("%s; sampling with the naive sampler", e)
                self.sampler = PriorSampler(bundle, self.sessions, method="naive")

    @property
    def can_sample(self) -> bool:
        return self.sampler is not None

    @property
    def sampler_method(self) -> str | None:
        return self.sampler.method if self.sampler else None

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.sessions["encoder"].run(None, {"images": images})
        return dict(zip(self._enc_out, outs))

    def decode(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        return self.sessions["decoder"].run(None, {name: codes[name] for name in self._dec_in})[0]

    def sample(self, noise_top: np.ndarray | None, noise_bottom: np.ndarray, temperature: np.ndarray,
               top_k: np.ndarray) -> dict[str, np.ndarray]:
        if self.sampler is None:
            raise RuntimeError("this bundle has no priors")
        top, bottom = self.sampler.sample(noise_top, noise_bottom, temperature, top_k)
        return {"top": top, "bottom": bottom} if "top" in self.levels else {"bottom": bottom}

    def warmup(self) -> None:
        size = self.bundle.image_size
        for batch in sorted({1, self.cfg.warmup_batch}):
            codes = self.encode(np.zeros((batch, size, size, 3), dtype=np.uint8))
            self.decode(codes)
        if self.sampler is not None:
            # One full prior pass per graph; the sampling loop itself needs no warming beyond that.
            for level in self.levels:
                sess = self.sessions[f"prior_{level}"]
                names = [i.name for i in sess.get_inputs()]
                sess.run(None, {n: codes[n][:1] for n in names})
            from service.sampling import noise_for

            top, bottom = noise_for(self.bundle, 0, 1)
            self.sample(top, bottom, np.ones(1, np.float32), np.zeros(1, np.int64))
