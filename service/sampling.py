"""Sampling codes from a bundle's priors with ONNX Runtime: naive (one full forward pass per code)
or cached (Fast-PixelCNN step graphs, O(layers) per code). No torch here.

Semantics shared by every sampler (``training.fast_sampling`` uses the same ``pick_codes``):
Gumbel noise for every position is drawn up front, and the code at a position is

    argmax over the top-k logits of (logits / temperature + noise)

(top_k 0 or >= K: all codes; temperature <= 0: plain argmax of the logits, noise ignored). The naive
and cached samplers consume the noise identically, so one seed gives the same codes from both (up
to float round-off deciding an exact near-tie, which we have not seen happen).

The cached loop (see ``training/fast_sampling.py`` for the caches) per level of the grid:

    condv, condh = cond(top)                              # bottom prior only, once
    for each row i:   hbias, vcache = row(codes[:, i-1], i, vcache[, condv, condh])
                      hcache = 0; prev = K (pad code)
        for each col j: logits, hcache = pixel(prev, j, hbias, hcache); prev = pick(logits)

All n samples of a batch go through each step call together.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from service.config import CUDA

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime

    from service.bundle import Bundle

METHODS = ("cached", "naive")


def gumbel_noise(seed: int | Sequence[int], n: int, h: int, w: int, k: int) -> np.ndarray:
    """Standard Gumbel noise, float32 [n, h, w, k], from ``np.random.default_rng(seed)``."""
    u = np.random.default_rng(seed).random((n, h, w, k), dtype=np.float32)
    np.maximum(u, np.finfo(np.float32).tiny, out=u)
    return -np.log(-np.log(u))


def noise_for(bundle: Bundle, seed: int, n: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(noise_top, noise_bottom) for ``n`` samples of the bundle's image size.

    The top grid uses ``default_rng(seed)``, the bottom ``default_rng([seed, 1])``, so the two are
    independent and seed s never reuses seed s+1's stream.
    """
    levels, size = bundle.levels, bundle.image_size
    top = None
    if "top" in levels:
        lv = levels["top"]
        top = gumbel_noise(seed, n, *lv.grid(size, size), lv.codebook_size)
    lv = levels["bottom"]
    return top, gumbel_noise([seed, 1], n, *lv.grid(size, size), lv.codebook_size)


def pick_codes(logits: np.ndarray, noise: np.ndarray, temperature: np.ndarray, top_k: np.ndarray) -> np.ndarray:
    """Gumbel-max codes int64 [n] from logits [n, K], noise [n, K], temperature [n], top_k [n]."""
    logits = np.asarray(logits, dtype=np.float32)
    n, K = logits.shape
    t = np.asarray(temperature, dtype=np.float32).reshape(n)
    greedy = t <= 0
    if greedy.any():
        z = logits / np.where(greedy, np.float32(1), t)[:, None]
        z[~greedy] += noise[~greedy]
    else:
        z = logits / t[:, None] + noise
    k = np.asarray(top_k, dtype=np.int64).reshape(n)
    limited = (k > 0) & (k < K)
    if limited.any():
        rows = np.flatnonzero(limited)
        kk = k[rows]
        if (kk == kk[0]).all():
            thr = np.partition(logits[rows], K - kk[0], axis=1)[:, K - kk[0]]
        else:
            thr = np.sort(logits[rows], axis=1)[np.arange(len(rows)), K - kk]
        sub = z[rows]
        sub[logits[rows] < thr[:, None]] = -np.inf
        z[rows] = sub
    return z.argmax(axis=1).astype(np.int64)


def cache_zeros(spec: list, n: int, width: int) -> np.ndarray:
    """Zeros float32 for a manifest cache shape such as ["batch", 128, 2, "width"]."""
    dims = {"batch": n, "width": width}
    return np.zeros([dims[d] if isinstance(d, str) else int(d) for d in spec], dtype=np.float32)


def has_cached_graphs(bundle: Bundle) -> bool:
    """Whether the bundle ships step graphs for each of its priors (bundles exported before issue 4 do not)."""
    sampling = bundle.manifest.get("sampling", {})
    priors = [name for name in bundle.levels if bundle.has(f"prior_{name}")]
    return bool(priors) and all(name in sampling for name in priors)


class PriorSampler:
    """Samples (top, bottom) code grids from a bundle's priors with ONNX Runtime sessions."""

    def __init__(self, bundle: Bundle, sessions: dict[str, onnxruntime.InferenceSession],
                 method: str = "cached", *, io_binding: bool | None = None):
        """``io_binding``: keep the caches in ORT-owned memory (OrtValues) between step calls;
        None = only when the step graphs run on CUDA, where it saves two copies per step."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.bundle, self.method, self.io_binding = bundle, method, io_binding
        self.sessions = dict(sessions)
        levels, size = bundle.levels, bundle.image_size
        self.levels = [name for name in ("top", "bottom") if name in levels]
        self.grids = {name: levels[name].grid(size, size) for name in self.levels}
        self.num_codes = {name: levels[name].codebook_size for name in self.levels}
        self.info = bundle.manifest.get("sampling", {})
        for name in self.levels:
            for graph in self._graphs(name):
                self.session(graph)
        self._cols: dict[int, list[np.ndarray]] = {}

    # -- sessions -----------------------------------------------------------------------------
    def _graphs(self, level: str) -> list[str]:
        if self.method == "naive":
            return [f"prior_{level}"]
        if level not in self.info:
            from service.bundle import BundleError

            raise BundleError(f"bundle {self.bundle.root} has no cached-sampling graphs for the {level} prior "
                              "(no manifest['sampling']); re-export it or use the naive sampler")
        info = self.info[level]
        return [g for g in (info.get("cond"), info["row"], info["pixel"]) if g]

    def session(self, graph: str) -> onnxruntime.InferenceSession:
        if graph not in self.sessions:
            import onnxruntime as ort

            template = next(iter(self.sessions.values()), None)
            if template is not None:
                providers = template.get_providers()
                options = template.get_provider_options()
                self.sessions[graph] = ort.InferenceSession(str(self.bundle.path(graph)),
                                                            sess_options=template.get_session_options(),
                                                            providers=providers,
                                                            provider_options=[options.get(p, {}) for p in providers])
            else:
                self.sessions[graph] = ort.InferenceSession(str(self.bundle.path(graph)),
                                                            providers=["CPUExecutionProvider"])
        return self.sessions[graph]

    # -- public -------------------------------------------------------------------------------
    def sample(self, noise_top: np.ndarray | None, noise_bottom: np.ndarray, temperature: np.ndarray,
               top_k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top codes int64 [n, ht, wt], then bottom codes int64 [n, hb, wb] conditioned on them."""
        n = noise_bottom.shape[0]
        temperature = np.ascontiguousarray(np.broadcast_to(np.asarray(temperature, dtype=np.float32), (n,)))
        top_k = np.ascontiguousarray(np.broadcast_to(np.asarray(top_k, dtype=np.int64), (n,)))
        top = None
        if "top" in self.levels:
            top = self._level("top", self._check("top", noise_top, n), temperature, top_k, None)
        cond = top if self._conditioned("bottom") else None
        bottom = self._level("bottom", self._check("bottom", noise_bottom, n), temperature, top_k, cond)
        if top is None:
            top = np.zeros((n, 0, 0), dtype=np.int64)
        return top, bottom

    # -- internals ----------------------------------------------------------------------------
    def _check(self, level: str, noise: np.ndarray | None, n: int) -> np.ndarray:
        want = (n, *self.grids[level], self.num_codes[level])
        if noise is None or tuple(noise.shape) != want:
            got = None if noise is None else tuple(noise.shape)
            raise ValueError(f"noise for the {level} grid must have shape {want}, got {got}")
        return np.asarray(noise, dtype=np.float32)

    def _conditioned(self, level: str) -> bool:
        if self.method == "cached":
            return bool(self.info[level].get("cond"))
        return len(self.session(f"prior_{level}").get_inputs()) > 1

    def _level(self, level: str, noise: np.ndarray, t: np.ndarray, k: np.ndarray,
               cond: np.ndarray | None) -> np.ndarray:
        if self.method == "naive":
            return self._naive(level, noise, t, k, cond)
        return self._cached(level, noise, t, k, cond)

    def _naive(self, level: str, noise: np.ndarray, t: np.ndarray, k: np.ndarray,
               cond: np.ndarray | None) -> np.ndarray:
        sess = self.session(f"prior_{level}")
        n, H, W, _ = noise.shape
        codes = np.zeros((n, H, W), dtype=np.int64)
        names = [i.name for i in sess.get_inputs()]
        feeds = {names[0]: codes}
        if cond is not None:
            feeds[names[1]] = cond
        for i in range(H):
            for j in range(W):
                logits = sess.run(None, feeds)[0]
                codes[:, i, j] = pick_codes(logits[:, :, i, j], noise[:, i, j], t, k)
        return codes

    def _col_index(self, width: int) -> list[np.ndarray]:
        if width not in self._cols:
            self._cols[width] = [np.array([j], dtype=np.int64) for j in range(width)]
        return self._cols[width]

    def _device(self, sess: onnxruntime.InferenceSession) -> tuple[str, int] | None:
        """(device, id) to keep caches on with IOBinding, or None for plain numpy feeds."""
        provider = sess.get_providers()[0]
        on_cuda = provider == CUDA
        if self.io_binding is False or (self.io_binding is None and not on_cuda):
            return None
        if on_cuda:
            return "cuda", int(sess.get_provider_options().get(provider, {}).get("device_id", 0))
        return "cpu", 0

    def _cached(self, level: str, noise: np.ndarray, t: np.ndarray, k: np.ndarray,
                cond: np.ndarray | None) -> np.ndarray:
        info = self.info[level]
        row_sess, pix_sess = self.session(info["row"]), self.session(info["pixel"])
        device = self._device(pix_sess)
        if device is not None:
            return self._cached_bound(level, noise, t, k, cond, device)
        n, H, W, _ = noise.shape
        codes = np.zeros((n, H, W), dtype=np.int64)
        feeds = {"vcache": cache_zeros(info["vcache"], n, W)}
        if info.get("cond"):
            if cond is None:
                raise ValueError(f"the {level} prior is conditioned on the top codes")
            feeds["condv"], feeds["condh"] = self.session(info["cond"]).run(None, {"top": cond})
        pad = np.full(n, info["pad_code"], dtype=np.int64)
        cols, rows = self._col_index(W), self._col_index(H)
        hcache0 = cache_zeros(info["hcache"], n, W)
        for i in range(H):
            feeds["codes"] = np.ascontiguousarray(codes[:, max(i - 1, 0)])
            feeds["row"] = rows[i]
            hbias, feeds["vcache"] = row_sess.run(None, feeds)
            px = {"prev": pad, "hbias": hbias, "hcache": hcache0}
            for j in range(W):
                px["col"] = cols[j]
                logits, px["hcache"] = pix_sess.run(None, px)
                px["prev"] = code = pick_codes(logits, noise[:, i, j], t, k)
                codes[:, i, j] = code
        return codes

    def _cached_bound(self, level: str, noise: np.ndarray, t: np.ndarray, k: np.ndarray,
                      cond: np.ndarray | None, device: tuple[str, int]) -> np.ndarray:
        """The cached loop with IOBinding: caches, row bias and conditioning stay as OrtValues on
        ``device``; only the codes go in and the logits [n, K] come out each step."""
        import onnxruntime as ort

        info = self.info[level]
        row_sess, pix_sess = self.session(info["row"]), self.session(info["pixel"])
        dev, dev_id = device
        n, H, W, _ = noise.shape
        codes = np.zeros((n, H, W), dtype=np.int64)
        row_b, pix_b = row_sess.io_binding(), pix_sess.io_binding()
        vcache = ort.OrtValue.ortvalue_from_numpy(cache_zeros(info["vcache"], n, W), dev, dev_id)
        hcache0 = ort.OrtValue.ortvalue_from_numpy(cache_zeros(info["hcache"], n, W), dev, dev_id)
        if info.get("cond"):
            if cond is None:
                raise ValueError(f"the {level} prior is conditioned on the top codes")
            cond_sess = self.session(info["cond"])
            cond_b = cond_sess.io_binding()
            cond_b.bind_cpu_input("top", np.ascontiguousarray(cond))
            cond_b.bind_output("condv", dev, dev_id)
            cond_b.bind_output("condh", dev, dev_id)
            cond_sess.run_with_iobinding(cond_b)
            condv, condh = cond_b.get_outputs()
            row_b.bind_ortvalue_input("condv", condv)
            row_b.bind_ortvalue_input("condh", condh)
        pad = np.full(n, info["pad_code"], dtype=np.int64)
        cols, rows = self._col_index(W), self._col_index(H)
        for i in range(H):
            row_b.bind_cpu_input("codes", np.ascontiguousarray(codes[:, max(i - 1, 0)]))
            row_b.bind_cpu_input("row", rows[i])
            row_b.bind_ortvalue_input("vcache", vcache)
            # Fresh outputs every call: an output must never alias the cache it is computed from.
            row_b.bind_output("hbias", dev, dev_id)
            row_b.bind_output("vcache_out", dev, dev_id)
            row_sess.run_with_iobinding(row_b)
            hbias, vcache = row_b.get_outputs()
            pix_b.bind_ortvalue_input("hbias", hbias)
            hcache, prev = hcache0, pad
            for j in range(W):
                pix_b.bind_cpu_input("prev", prev)
                pix_b.bind_cpu_input("col", cols[j])
                pix_b.bind_ortvalue_input("hcache", hcache)
                pix_b.bind_output("logits", "cpu")
                pix_b.bind_output("hcache_out", dev, dev_id)
                pix_sess.run_with_iobinding(pix_b)
                logits, hcache = pix_b.get_outputs()
                prev = pick_codes(logits.numpy(), noise[:, i, j], t, k)
                codes[:, i, j] = prev
        return codes
