"""Fast cached sampling for ``GatedPixelCNN`` (Ramachandran et al. 2017, "Fast Generation for
Convolutional Autoregressive Models"): the step functions over explicit caches, as a PyTorch module.

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

A module only, no I/O: the ONNX step graphs are exported by ``training.export_steps``, the torch
samplers walking these steps live in ``training.fast_sampling`` and the ONNX Runtime walk over the
exported graphs in ``service.runtime.sampler``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.pixelcnn import GatedPixelCNN


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
