"""Sampling code grids from a bundle's priors with ONNX Runtime: naive (one full forward pass per
code) or cached (Fast-PixelCNN step graphs, O(layers) per code). No torch here.

What a seed means and how a code is picked is the bundle's contract (``service.bundle.sampling``);
the PyTorch samplers in ``training.fast_sampling`` follow it too, so both give the same codes.

The cached loop (see ``models/cached_prior.py`` for the caches), per level, in raster order:

    condv, condh = cond(coarser codes)                    # conditioned priors only, once
    for each row i:   hbias, vcache = row(codes[:, i-1], i, vcache[, condv, condh])
                      hcache = 0; prev = K (pad code)
        for each col j: logits, hcache = pixel(prev, j, hbias, hcache); prev = visit(i, j, logits)

``cached_walk`` is that loop, written once: sampling visits with ``pick_codes``, the export parity
check visits with the true codes (teacher forcing). The steps run on numpy feeds, or with IOBinding
when the step graphs run on CUDA (the caches then stay on the device between calls). All n samples
of a batch go through each step call together.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort

from service.bundle import Bundle, BundleError, prior_graph
from service.bundle.sampling import cache_zeros, pick_codes
from service.runtime.session import CUDA, RuntimeConfig, cuda_device_id, open_session


def never() -> bool:
    """The default ``should_stop``: run to the end."""
    return False

METHODS = ("cached", "naive")
Visit = Callable[[int, int, np.ndarray], np.ndarray]


def _index(k: int) -> np.ndarray:
    return np.array([k], dtype=np.int64)


class _Steps:
    """The row/pixel(/cond) step graphs on plain numpy feeds."""

    def __init__(self, sessions: dict[str, ort.InferenceSession], info: dict[str, Any], n: int, width: int,
                 cond: np.ndarray | None):
        self.row_sess, self.pix_sess = sessions[info["row"]], sessions[info["pixel"]]
        self.feeds: dict[str, np.ndarray] = {"vcache": cache_zeros(info["vcache"], n, width)}
        if info.get("cond"):
            if cond is None:
                raise ValueError("this prior is conditioned on the coarser level's codes")
            cond_sess = sessions[info["cond"]]
            self.feeds["condv"], self.feeds["condh"] = cond_sess.run(None, {cond_sess.get_inputs()[0].name: cond})
        self.hcache0 = cache_zeros(info["hcache"], n, width)

    def row(self, completed: np.ndarray, i: int) -> None:
        self.feeds["codes"] = np.ascontiguousarray(completed)
        self.feeds["row"] = _index(i)
        hbias, self.feeds["vcache"] = self.row_sess.run(None, self.feeds)
        self.px = {"hbias": hbias, "hcache": self.hcache0}

    def pixel(self, prev: np.ndarray, j: int) -> np.ndarray:
        self.px["prev"], self.px["col"] = prev, _index(j)
        logits, self.px["hcache"] = self.pix_sess.run(None, self.px)
        return logits


class _BoundSteps:
    """The same steps with IOBinding: caches, row bias and conditioning stay as OrtValues on the
    device; only the codes go in and the logits [n, K] come out each step."""

    def __init__(self, sessions: dict[str, ort.InferenceSession], info: dict[str, Any], n: int, width: int,
                 cond: np.ndarray | None, device: tuple[str, int]):
        self.dev, self.dev_id = device
        self.row_sess, self.pix_sess = sessions[info["row"]], sessions[info["pixel"]]
        self.row_b, self.pix_b = self.row_sess.io_binding(), self.pix_sess.io_binding()
        self.vcache = ort.OrtValue.ortvalue_from_numpy(cache_zeros(info["vcache"], n, width), self.dev, self.dev_id)
        self.hcache0 = ort.OrtValue.ortvalue_from_numpy(cache_zeros(info["hcache"], n, width), self.dev, self.dev_id)
        if info.get("cond"):
            if cond is None:
                raise ValueError("this prior is conditioned on the coarser level's codes")
            cond_sess = sessions[info["cond"]]
            cond_b = cond_sess.io_binding()
            cond_b.bind_cpu_input(cond_sess.get_inputs()[0].name, np.ascontiguousarray(cond))
            cond_b.bind_output("condv", self.dev, self.dev_id)
            cond_b.bind_output("condh", self.dev, self.dev_id)
            cond_sess.run_with_iobinding(cond_b)
            condv, condh = cond_b.get_outputs()
            self.row_b.bind_ortvalue_input("condv", condv)
            self.row_b.bind_ortvalue_input("condh", condh)

    def row(self, completed: np.ndarray, i: int) -> None:
        b = self.row_b
        b.bind_cpu_input("codes", np.ascontiguousarray(completed))
        b.bind_cpu_input("row", _index(i))
        b.bind_ortvalue_input("vcache", self.vcache)
        # Fresh outputs every call: an output must never alias the cache it is computed from.
        b.bind_output("hbias", self.dev, self.dev_id)
        b.bind_output("vcache_out", self.dev, self.dev_id)
        self.row_sess.run_with_iobinding(b)
        hbias, self.vcache = b.get_outputs()
        self.pix_b.bind_ortvalue_input("hbias", hbias)
        self.hcache = self.hcache0

    def pixel(self, prev: np.ndarray, j: int) -> np.ndarray:
        b = self.pix_b
        b.bind_cpu_input("prev", prev)
        b.bind_cpu_input("col", _index(j))
        b.bind_ortvalue_input("hcache", self.hcache)
        b.bind_output("logits", "cpu")
        b.bind_output("hcache_out", self.dev, self.dev_id)
        self.pix_sess.run_with_iobinding(b)
        logits, self.hcache = b.get_outputs()
        return logits.numpy()


def cached_walk(steps: _Steps | _BoundSteps, info: dict[str, Any], n: int, height: int, width: int,
                visit: Visit) -> np.ndarray:
    """Step a prior over an n x height x width grid in raster order; ``visit(i, j, logits)`` returns
    the codes [n] placed at (i, j), which the following steps then see."""
    codes = np.zeros((n, height, width), dtype=np.int64)
    pad = np.full(n, info["pad_code"], dtype=np.int64)
    for i in range(height):
        steps.row(codes[:, max(i - 1, 0)], i)
        prev = pad
        for j in range(width):
            prev = visit(i, j, steps.pixel(prev, j))
            codes[:, i, j] = prev
    return codes


def teacher_forcing(sessions: dict[str, ort.InferenceSession], info: dict[str, Any], codes: np.ndarray,
                    cond: np.ndarray | None = None) -> np.ndarray:
    """Logits [n, K, H, W] from the step graphs fed the true codes (export parity, tests)."""
    n, H, W = codes.shape
    out = np.empty((n, info["num_codes"], H, W), dtype=np.float32)

    def visit(i: int, j: int, logits: np.ndarray) -> np.ndarray:
        out[:, :, i, j] = logits
        return codes[:, i, j]

    cached_walk(_Steps(sessions, info, n, W, cond), info, n, H, W, visit)
    return out


class PriorSampler:
    """Samples every level's code grid from a bundle's priors, coarsest first, each conditioned on
    the one before it where the manifest says so."""

    def __init__(self, bundle: Bundle, sessions: dict[str, ort.InferenceSession] | None = None,
                 method: str = "cached", *, cfg: RuntimeConfig | None = None, io_binding: bool | None = None):
        """``sessions``: graphs already open (the backend's); missing ones are opened with ``cfg``.
        ``io_binding``: keep the caches in ORT-owned memory between step calls; None = only when
        the step graphs run on CUDA, where it saves two copies per step."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.bundle, self.method, self.io_binding = bundle, method, io_binding
        self.cfg = cfg or RuntimeConfig(device="cpu")
        self.sessions = dict(sessions or {})
        size = bundle.image_size
        self.levels = bundle.level_names
        self.grids = {name: lv.grid(size, size) for name, lv in bundle.levels.items()}
        self.num_codes = {name: lv.codebook_size for name, lv in bundle.levels.items()}
        self.info = bundle.sampling
        for name in self.levels:
            for graph in self._graphs(name):
                self.session(graph)

    def _graphs(self, level: str) -> list[str]:
        if self.method == "naive":
            return [prior_graph(level)]
        if level not in self.info:
            raise BundleError(f"bundle {self.bundle.root} has no cached-sampling graphs for the {level} prior "
                              "(no manifest['sampling']); re-export it or use the naive sampler")
        info = self.info[level]
        return [g for g in (info.get("cond"), info["row"], info["pixel"]) if g]

    def session(self, graph: str) -> ort.InferenceSession:
        if graph not in self.sessions:
            self.sessions[graph] = open_session(self.bundle.path(graph), self.cfg)
        return self.sessions[graph]

    def sample(self, noise: dict[str, np.ndarray], temperature: np.ndarray, top_k: np.ndarray,
               should_stop: Callable[[], bool] = never) -> dict[str, np.ndarray]:
        """{level: int64 codes [n, h, w]} from per-level noise [n, h, w, K] (``noise_for``).

        ``should_stop`` is asked before every row; when it turns true (nobody waits for this batch any
        more: cancelled requests, a shutdown) the loop raises ``SamplingStopped``."""
        n = next(iter(noise.values())).shape[0]
        temperature = np.ascontiguousarray(np.broadcast_to(np.asarray(temperature, dtype=np.float32), (n,)))
        top_k = np.ascontiguousarray(np.broadcast_to(np.asarray(top_k, dtype=np.int64), (n,)))
        out: dict[str, np.ndarray] = {}
        for i, level in enumerate(self.levels):
            cond = out[self.levels[i - 1]] if i > 0 and self._conditioned(level) else None
            level_noise = self._check(level, noise.get(level), n)
            if self.method == "naive":
                out[level] = self._naive(level, level_noise, temperature, top_k, cond, should_stop)
            else:
                out[level] = self._cached(level, level_noise, temperature, top_k, cond, should_stop)
        return out

    def _check(self, level: str, noise: np.ndarray | None, n: int) -> np.ndarray:
        want = (n, *self.grids[level], self.num_codes[level])
        if noise is None or tuple(noise.shape) != want:
            got = None if noise is None else tuple(noise.shape)
            raise ValueError(f"noise for the {level} grid must have shape {want}, got {got}")
        return np.asarray(noise, dtype=np.float32)

    def _conditioned(self, level: str) -> bool:
        if self.method == "cached":
            return bool(self.info[level].get("cond"))
        return len(self.session(prior_graph(level)).get_inputs()) > 1

    def _naive(self, level: str, noise: np.ndarray, t: np.ndarray, k: np.ndarray,
               cond: np.ndarray | None, should_stop: Callable[[], bool]) -> np.ndarray:
        sess = self.session(prior_graph(level))
        n, H, W, _ = noise.shape
        codes = np.zeros((n, H, W), dtype=np.int64)
        names = [i.name for i in sess.get_inputs()]
        feeds = {names[0]: codes}
        if cond is not None:
            feeds[names[1]] = cond
        for i in range(H):
            if should_stop():
                raise SamplingStopped(f"stopped at row {i} of the {level} grid")
            for j in range(W):
                logits = sess.run(None, feeds)[0]
                codes[:, i, j] = pick_codes(logits[:, :, i, j], noise[:, i, j], t, k)
        return codes

    def _device(self, sess: ort.InferenceSession) -> tuple[str, int] | None:
        """(device, id) to keep caches on with IOBinding, or None for plain numpy feeds."""
        provider = sess.get_providers()[0]
        on_cuda = provider == CUDA
        if self.io_binding is False or (self.io_binding is None and not on_cuda):
            return None
        if on_cuda:
            return "cuda", cuda_device_id(sess)
        return "cpu", 0

    def _cached(self, level: str, noise: np.ndarray, t: np.ndarray, k: np.ndarray,
                cond: np.ndarray | None, should_stop: Callable[[], bool]) -> np.ndarray:
        info = self.info[level]
        n, H, W, _ = noise.shape
        sessions = {g: self.session(g) for g in self._graphs(level)}
        device = self._device(sessions[info["pixel"]])
        steps = (_Steps(sessions, info, n, W, cond) if device is None
                 else _BoundSteps(sessions, info, n, W, cond, device))

        def visit(i: int, j: int, logits: np.ndarray) -> np.ndarray:
            if j == 0 and should_stop():
                raise SamplingStopped(f"stopped at row {i} of the {level} grid")
            return pick_codes(logits, noise[:, i, j], t, k)

        return cached_walk(steps, info, n, H, W, visit)


class SamplingStopped(RuntimeError):
    """The loop was told to stop (nobody waits for its samples any more)."""
