"""The inference backend: ONNX Runtime sessions behind a small interface.

Everything here is synchronous and array-in, array-out; batchers call it from their own thread.
The ``Backend`` protocol is what the API sees, so tests can wrap or replace it. Level names and
graph I/O names come from the bundle.
"""
from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import onnxruntime as ort

from service.bundle import DECODER, ENCODER, Bundle, BundleError, prior_graph
from service.bundle.sampling import noise_for
from service.runtime.codelength import prior_bits
from service.runtime.sampler import PriorSampler
from service.runtime.session import CUDA, DeviceUnavailable, RuntimeConfig, open_session, session_options

log = logging.getLogger("vqtok.runtime")

Codes = dict[str, np.ndarray]  # level name -> int64 grids


class Backend(Protocol):
    bundle: Bundle
    provider: str

    @property
    def can_sample(self) -> bool: ...

    def encode(self, images: np.ndarray) -> Codes:
        """uint8 [B, H, W, 3] -> {level: int64 [B, H/stride, W/stride]}."""

    def decode(self, codes: Codes) -> np.ndarray:
        """{level: int64 grids} -> uint8 [B, H, W, 3]."""

    def sample(self, noise: dict[str, np.ndarray], temperature: np.ndarray, top_k: np.ndarray) -> Codes:
        """Per-sample noise {level: [B, h, w, K]}, temperature [B], top_k [B] -> {level: int64 code grids}."""

    def code_bits(self, codes: Codes) -> dict[str, np.ndarray]:
        """{level: int64 grids [B, h, w]} -> {level: float64 [B]}, each item's code length under the priors."""

    def warmup(self) -> None:
        """Run every graph once so the first request does not pay for allocation and kernel choice."""


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
                self.sessions[graph] = open_session(bundle.path(graph), cfg, opts)
            except DeviceUnavailable:
                raise
            except Exception as e:
                raise BundleError(f"bundle file {entry['path']} ({graph}) does not load in ONNX Runtime: {e}") from e
            if cfg.device == "auto" and graph == ENCODER and self.sessions[graph].get_providers()[0] != CUDA:
                cfg = cfg.on_cpu()  # don't retry CUDA for every graph
        self.cfg = cfg
        self.provider = self.sessions[ENCODER].get_providers()[0]
        self.levels = bundle.level_names
        self._enc_out = [o.name for o in self.sessions[ENCODER].get_outputs()]
        self._dec_in = [i.name for i in self.sessions[DECODER].get_inputs()]
        self.sampler: PriorSampler | None = None
        if bundle.can_sample:
            try:
                self.sampler = PriorSampler(bundle, self.sessions, method=cfg.sampler, cfg=cfg)
            except BundleError as e:
                log.warning("%s; sampling with the naive sampler", e)
                self.sampler = PriorSampler(bundle, self.sessions, method="naive", cfg=cfg)

    @property
    def can_sample(self) -> bool:
        return self.sampler is not None

    @property
    def sampler_method(self) -> str | None:
        return self.sampler.method if self.sampler else None

    def encode(self, images: np.ndarray) -> Codes:
        outs = self.sessions[ENCODER].run(None, {"images": images})
        return dict(zip(self._enc_out, outs))

    def decode(self, codes: Codes) -> np.ndarray:
        return self.sessions[DECODER].run(None, {name: codes[name] for name in self._dec_in})[0]

    def sample(self, noise: dict[str, np.ndarray], temperature: np.ndarray, top_k: np.ndarray) -> Codes:
        if self.sampler is None:
            raise RuntimeError("this bundle has no priors")
        return self.sampler.sample(noise, temperature, top_k)

    def code_bits(self, codes: Codes) -> dict[str, np.ndarray]:
        if self.sampler is None:
            raise RuntimeError("this bundle has no priors")
        return prior_bits(self.bundle, self.sessions, codes)

    def warmup(self) -> None:
        size = self.bundle.image_size
        for batch in sorted({1, self.cfg.warmup_batch}):
            codes = self.encode(np.zeros((batch, size, size, 3), dtype=np.uint8))
            self.decode(codes)
        if self.sampler is not None:
            # One full prior pass per graph; the sampling loop itself needs no warming beyond that.
            for level in self.levels:
                sess = self.sessions[prior_graph(level)]
                names = [i.name for i in sess.get_inputs()]
                sess.run(None, {n: codes[n][:1] for n in names})
            self.sample(noise_for(self.bundle, 0, 1), np.ones(1, np.float32), np.zeros(1, np.int64))
