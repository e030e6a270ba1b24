"""Fast cached sampling for ``GatedPixelCNN`` (Ramachandran et al. 2017, "Fast Generation for
Convolutional Autoregressive Models"), in PyTorch and as ONNX step graphs.

Naive sampling runs the whole prior once per code. Here every code costs O(layers): the stepper
keeps, per layer, exactly the activations that the next convolutions read, and computes nothing
twice. The caches follow the places where ``models/pixelcnn.py`` inserts zeros:

* **vertical cache** ``vcache`` [n, L, C, p, W]: for every layer, the last p rows of that layer's
  vertical input (layer 0: the embedded codes; layer l: gate(v_pre) of layer l-1), p = kernel//2.
  Zeros at the start are the conv's top padding; the left/right padding is re-applied per row.
* **row step** (``row``): once row r-1 of codes is complete, one pass through all layers computes
  each layer's vertical output for row r-1 and the *row bias* ``hbias`` [n, L, 2C, W] for row r:
  ``link(v_raw[r-1]) + cond_h[r]``. For r = 0 the completed row is masked to zeros, which gives
  ``link(0) = link bias`` on row 0 exactly as ``link(shift_down(v_raw))`` does, and leaves the
  vertical caches at zero (the top padding).
* **horizontal cache** ``hcache`` [n, L, C, p]: for layer 0 the embeddings of columns j-p-1..j-2
  (the step appends column j-1, the code just sampled), for layer l >= 1 the layer input h at
  columns j-p..j-1 (the step appends column j, computed in the same step). Reset to zeros at the
  start of each row (the conv's left padding); column -1 is the zero "pad code" K.
* **pixel step** (``pixel``): per code only the horizontal window convs (as one matmul each), the
  1x1 convs, the gates and the head run.
* **conditioning** (bottom prior): ``condition_features`` and every layer's 1x1 cond projection
  run once per grid (``cond``), giving ``condv``/``condh`` [n, H, L, 2C, W].

The same three functions are exported as ONNX graphs (``export_step_graphs``) with every cache an
explicit input and output. Sampling itself (Gumbel-max with temperature and top-k over pre-drawn
noise) is the bundle contract's (``service.bundle.sampling``), shared by the torch and ONNX
samplers, so the naive and the cached sampler consume the same noise the same way and return the
same codes. The ONNX Runtime walk over the step graphs lives in ``service.runtime.sampler``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.pixelcnn import GatedPixelCNN
from service.bundle.sampling import pick_codes
from training.onnx_graph import export_onnx


class CachedPrior(nn.Module):
    """Step functions over explicit caches for a (frozen) ``GatedPixelCNN``.

    Layouts (chosen so the exported graphs are short chains of Slice/Concat/Gemm/Conv):

    * ``vcache`` [n, L*C, p, W]: layer l's last p input rows in channels l*C..(l+1)*C.
    * ``hcache`` [n, L*p*C]: layer l's window in l*p*C..(l+1)*p*C, p positions oldest first, C each.
    * ``hbias`` [n, W, L*2C]: per column, every layer's link term (+ cond_h) for the current row.
    * ``condv``/``condh`` [n, L*2C, H, W]: every layer's 1x1 cond projection, computed once.

    Weights are read from ``prior`` when this wrapper is built; build a new one after training.
    """

    def __init__(self, prior: GatedPixelCNN):
        super().__init__()
        cfg = prior.config
        self.prior = prior  # no dropout/batch-norm in the model; samplers still run it in eval mode
        self.L, self.C, self.p, self.K = cfg.layers, cfg.channels, cfg.kernel // 2, cfg.num_codes
        self.conditioned = prior.condition is not None and cfg.cond_codes > 0
        C, p = self.C, self.p
        with torch.no_grad():
            # Row K is the "pad code": a zero embedding for the position left of column 0.
            self.register_buffer("table", torch.cat([prior.embed.weight, prior.embed.weight.new_zeros(1, C)]))
            # Horizontal 1 x (p+1) convs as one matmul over a position-major flattened window.
            for l, lay in enumerate(prior.layers):
                w = lay.h_conv.weight[:, :, 0, :].permute(0, 2, 1).reshape(2 * C, (p + 1) * C)
                self.register_buffer(f"h_w{l}", w.contiguous())
                self.register_buffer(f"h_out_w{l}", lay.h_out.weight.flatten(1).contiguous())
            head = prior.head
            self.register_buffer("head_w1", head[1].weight.flatten(1).contiguous())
            self.register_buffer("head_w2", head[3].weight.flatten(1).contiguous())

    # -- shapes ------------------------------------------------------------------------------
    def init_vcache(self, n: int, width: int) -> torch.Tensor:
        return self.table.new_zeros(n, self.L * self.C, self.p, width)

    def init_hcache(self, n: int) -> torch.Tensor:
        return self.table.new_zeros(n, self.L * self.p * self.C)

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.C, self.C], dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    # -- step functions ----------------------------------------------------------------------
    def cond(self, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """condv, condh [n, L*2C, H, W]: every layer's cond projection, from the top codes."""
        feats = self.prior.condition_features(top, None)
        vs, hs = [], []
        for lay in self.prior.layers:
            cv, ch = lay.cond(feats).chunk(2, dim=1)  # [n, 2C, H, W] each
            vs.append(cv)
            hs.append(ch)
        return torch.cat(vs, 1), torch.cat(hs, 1)

    def row(self, codes: torch.Tensor, row: torch.Tensor, vcache: torch.Tensor,
            condv: torch.Tensor | None = None, condh: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Consume the completed row ``row - 1`` (codes [n, W]); return (hbias for ``row``, new vcache).

        ``row`` is int64 [1]. For row 0 the completed row is masked to zeros (``codes`` are ignored
        but must be valid indices), which gives the link bias on row 0 and keeps vcache at zero.
        """
        C, p = self.C, self.p
        mask = (row > 0).to(vcache.dtype)  # [1]
        cur = F.embedding(codes, self.table).transpose(1, 2).unsqueeze(2) * mask  # [n, C, 1, W]
        if self.conditioned:
            cv_row = condv.index_select(2, torch.clamp(row - 1, min=0))  # [n, L*2C, 1, W]
            ch_row = condh.index_select(2, row)
        hbias, new_v = [], []
        for l, lay in enumerate(self.prior.layers):
            win = torch.cat([vcache[:, l * C:(l + 1) * C], cur], dim=2)  # [n, C, p+1, W]: rows r-p..r
            new_v.append(win[:, :, 1:])
            v_raw = F.conv2d(win, lay.v_conv.weight, lay.v_conv.bias, padding=(0, p))  # [n, 2C, 1, W]
            hb = F.conv2d(v_raw * mask, lay.link.weight, lay.link.bias)
            v_pre = v_raw
            if self.conditioned:
                hb = hb + ch_row[:, 2 * l * C:2 * (l + 1) * C]
                v_pre = v_pre + cv_row[:, 2 * l * C:2 * (l + 1) * C]
            hbias.append(hb)
            cur = self._gate(v_pre) * mask
        n, W = codes.shape
        hbias = torch.cat(hbias, 1).reshape(n, self.L * 2 * C, W).transpose(1, 2)  # [n, W, L*2C]
        return hbias, torch.cat(new_v, 1)

    def pixel(self, prev: torch.Tensor, col: torch.Tensor, hbias: torch.Tensor, hcache: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [n, K] at column ``col`` (int64 [1]) of the current row, and the new hcache.

        ``prev`` [n] is the code at column col-1 (K, the pad code, at column 0).
        """
        C, p = self.C, self.p
        hb = hbias.index_select(1, col).flatten(1)  # [n, L*2C]
        h = F.embedding(prev, self.table)  # [n, C]
        new_h = []
        for l, lay in enumerate(self.prior.layers):
            win = torch.cat([hcache[:, l * p * C:(l + 1) * p * C], h], dim=1)  # [n, (p+1)*C]
            new_h.append(win[:, C:])
            h_pre = F.linear(win, getattr(self, f"h_w{l}"), lay.h_conv.bias) + hb[:, 2 * l * C:2 * (l + 1) * C]
            h_new = F.linear(self._gate(h_pre), getattr(self, f"h_out_w{l}"), lay.h_out.bias)
            h = h_new if l == 0 else h + h_new
        head = self.prior.head
        x = F.relu(F.linear(F.relu(h), self.head_w1, head[1].bias))
        return F.linear(x, self.head_w2, head[3].bias), torch.cat(new_h, 1)


# -- graph wrappers for export ------------------------------------------------------------------
class _CondGraph(nn.Module):
    def __init__(self, cp: CachedPrior):
        super().__init__()
        self.cp = cp

    def forward(self, top):
        return self.cp.cond(top)


class _RowGraph(nn.Module):
    def __init__(self, cp: CachedPrior):
        super().__init__()
        self.cp = cp

    def forward(self, codes, row, vcache, condv=None, condh=None):
        return self.cp.row(codes, row, vcache, condv, condh)


class _PixelGraph(nn.Module):
    def __init__(self, cp: CachedPrior):
        super().__init__()
        self.cp = cp

    def forward(self, prev, col, hbias, hcache):
        return self.cp.pixel(prev, col, hbias, hcache)


def export_step_graphs(prior: GatedPixelCNN, out_dir: str | Path, name: str, grid: tuple[int, int] = (4, 4),
                       cond_grid: tuple[int, int] | None = None, cond_name: str = "cond"
                       ) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write ``{name}_row.onnx``, ``{name}_pixel.onnx`` (and ``{name}_cond.onnx`` when conditioned,
    whose input is named ``cond_name``: the coarser level's name).

    ``grid`` is only the tracing shape (all spatial sizes and the batch are dynamic). Returns the
    written files keyed by graph name and the manifest ``sampling`` entry for this prior.
    """
    out = Path(out_dir)
    cp = CachedPrior(prior).eval()
    n, (h, w) = 2, grid
    files: dict[str, Path] = {}
    L, C, p = cp.L, cp.C, cp.p
    info: dict[str, Any] = {"row": f"{name}_row", "pixel": f"{name}_pixel", "cond": None,
                            "layers": L, "channels": C, "pad": p, "num_codes": cp.K, "pad_code": cp.K,
                            # cache shapes; "batch" = n, "width"/"height" = the grid's
                            "vcache": ["batch", L * C, p, "width"], "hcache": ["batch", L * p * C],
                            "hbias": ["batch", "width", L * 2 * C]}
    with torch.no_grad():
        codes = torch.randint(0, cp.K, (n, h, w))
        row_inputs, row_args = ["codes", "row", "vcache"], [codes[:, 0], torch.tensor([1]), cp.init_vcache(n, w)]
        row_axes = {"codes": {0: "batch", 1: "width"}, "vcache": {0: "batch", 3: "width"},
                    "hbias": {0: "batch", 1: "width"}, "vcache_out": {0: "batch", 3: "width"}}
        if cp.conditioned:
            ch, cw = cond_grid or (max(1, h // prior.config.cond_scale), max(1, w // prior.config.cond_scale))
            top = torch.randint(0, prior.config.cond_codes, (n, ch, cw))
            files[f"{name}_cond"] = out / f"{name}_cond.onnx"
            cond_axes = {k: {0: "batch", 2: "height", 3: "width"} for k in ("condv", "condh")}
            export_onnx(_CondGraph(cp), (top,), files[f"{name}_cond"], [cond_name], ["condv", "condh"],
                        {cond_name: {0: "batch", 1: f"{cond_name}_h", 2: f"{cond_name}_w"}, **cond_axes})
            info["cond"] = f"{name}_cond"
            info["condv"] = info["condh"] = ["batch", L * 2 * C, "height", "width"]
            condv, condh = cp.cond(top)
            row_inputs += ["condv", "condh"]
            row_args += [condv, condh]
            row_axes.update(cond_axes)
        files[f"{name}_row"] = out / f"{name}_row.onnx"
        export_onnx(_RowGraph(cp), tuple(row_args), files[f"{name}_row"], row_inputs, ["hbias", "vcache_out"], row_axes)
        hbias, _ = cp.row(*row_args)
        files[f"{name}_pixel"] = out / f"{name}_pixel.onnx"
        export_onnx(_PixelGraph(cp), (codes[:, 0, 0], torch.tensor([1]), hbias, cp.init_hcache(n)), files[f"{name}_pixel"],
                ["prev", "col", "hbias", "hcache"], ["logits", "hcache_out"],
                {"prev": {0: "batch"}, "hbias": {0: "batch", 1: "width"}, "hcache": {0: "batch"},
                 "logits": {0: "batch"}, "hcache_out": {0: "batch"}})
    return files, info


# -- torch samplers ---------------------------------------------------------------------------
def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def _in_eval_mode(fn):
    @functools.wraps(fn)
    def wrapper(prior, *args, **kwargs):
        with _eval_mode(prior):
            return fn(prior, *args, **kwargs)
    return wrapper


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (sampling mid-training must not leave the prior in eval mode)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _cached_walk(prior: GatedPixelCNN, n: int, height: int, width: int, cond: torch.Tensor | None,
                 visit: Callable[[int, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Step the cached prior over an n x height x width grid in raster order.

    ``visit(i, j, logits)`` gets the step's logits [n, K] and returns the codes [n] placed at (i, j),
    which the following steps then see: sampled codes when sampling, given ones when teacher forcing.
    """
    cp = CachedPrior(prior)
    codes = torch.zeros(n, height, width, dtype=torch.long)
    condv = condh = None
    if cp.conditioned:
        condv, condh = cp.cond(cond)
    vcache = cp.init_vcache(n, width)
    pad = torch.full((n,), cp.K, dtype=torch.long)
    for i in range(height):
        hbias, vcache = cp.row(codes[:, max(i - 1, 0)], torch.tensor([i]), vcache, condv, condh)
        hcache = cp.init_hcache(n)
        prev = pad
        for j in range(width):
            logits, hcache = cp.pixel(prev, torch.tensor([j]), hbias, hcache)
            prev = visit(i, j, logits)
            codes[:, i, j] = prev
    return codes


@_in_eval_mode
@torch.no_grad()
def teacher_forcing_logits(prior: GatedPixelCNN, codes: torch.Tensor, cond: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """Logits [n, K, H, W] computed position by position with the cached stepper on given codes."""
    n, height, width = codes.shape
    out = torch.empty(n, prior.config.num_codes, height, width)

    def visit(i: int, j: int, logits: torch.Tensor) -> torch.Tensor:
        out[:, :, i, j] = logits
        return codes[:, i, j]

    _cached_walk(prior, n, height, width, cond, visit)
    return out


@_in_eval_mode
@torch.no_grad()
def sample_naive_torch(prior: GatedPixelCNN, noise: np.ndarray, temperature: np.ndarray, top_k: np.ndarray,
                       cond: torch.Tensor | None = None) -> np.ndarray:
    """Codes [n, H, W] by one full forward pass per position (the reference sampler)."""
    n, H, W, _ = noise.shape
    codes = torch.zeros(n, H, W, dtype=torch.long)
    for i in range(H):
        for j in range(W):
            logits = prior(codes, cond)[:, :, i, j]
            codes[:, i, j] = torch.from_numpy(pick_codes(_np(logits), noise[:, i, j], temperature, top_k))
    return codes.numpy()


@_in_eval_mode
@torch.no_grad()
def sample_cached_torch(prior: GatedPixelCNN, noise: np.ndarray, temperature: np.ndarray, top_k: np.ndarray,
                        cond: torch.Tensor | None = None) -> np.ndarray:
    """Codes [n, H, W] with the cached stepper; the same noise gives the same codes as the naive sampler."""
    n, height, width, _ = noise.shape

    def visit(i: int, j: int, logits: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(pick_codes(_np(logits), noise[:, i, j], temperature, top_k))

    return _cached_walk(prior, n, height, width, cond, visit).numpy()


def sample_torch(priors: dict[str, GatedPixelCNN], noise: dict[str, np.ndarray], temperature: np.ndarray,
                 top_k: np.ndarray, method: str = "cached") -> dict[str, np.ndarray]:
    """Codes per level, coarsest first (the order of ``priors``), each conditioned on the previous
    level's codes when its prior takes them; naive or cached sampler."""
    fn = {"cached": sample_cached_torch, "naive": sample_naive_torch}[method]
    out: dict[str, np.ndarray] = {}
    prev = None
    for level, prior in priors.items():
        cond = torch.from_numpy(out[prev]) if prev is not None and prior.config.cond_codes > 0 else None
        out[level] = fn(prior, noise[level], temperature, top_k, cond)
        prev = level
    return out
