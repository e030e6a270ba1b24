"""Quantizers of the channel axis of a [B, D, H, W] tensor, as sibling classes with one contract.

In the style of Sonnet's VQ-VAE modules, every quantizer is called as ``q(z, training)`` with an
explicit ``training`` flag (state such as EMA codebooks moves only when it is True, so evaluation
and export never mutate anything) and returns a dict with the same keys:

- ``quantized``: [B, D, H, W], value = the code vectors, in z's dtype, with the chosen gradient;
- ``codes``: int64 [B, H, W] in [0, num_codes);
- ``loss``: scalar auxiliary loss (commitment, plus codebook for learned codebooks; 0 for FSQ);
- ``perplexity``: exp of the entropy of the batch code usage;
- ``usage``: per-code counts in this batch, float [num_codes].

Each one also has ``codes_for(z)`` (nearest-code search) and ``lookup(codes)`` (codes ->
[B, D, H, W]), both traceable by ``torch.onnx.export``: the bundle's encoder graph outputs codes
per level and its decoder graph starts from codes, whatever the kind.

Kinds (``QuantizerConfig.kind``, built by ``make_quantizer``):

- ``"ema"``: VectorQuantizerEMA, the VQ-VAE quantizer with an EMA codebook (the default; unchanged).
- ``"factorized"``: FactorizedQuantizer, low-dimensional l2-normalised codes (ViT-VQGAN, LlamaGen).
- ``"fsq"``: FiniteScalarQuantizer, finite scalar quantization (Mentzer et al. 2023).

Gradients (``QuantizerConfig.gradient``): ``"ste"`` (straight-through, identity) or ``"rotation"``
(the rotation trick, Fifty et al. 2024), see ``rotate_to``.

All quantizer math (distances, codebooks, EMA statistics) runs in float32 with autocast off, so
mixed-precision training does not change assignments or corrupt the float32 EMA buffers.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("ema", "factorized", "fsq")
GRADIENTS = ("ste", "rotation")


@dataclass
class QuantizerConfig:
    num_codes: int = 512  # K; for "fsq" it must equal the product of fsq_levels
    dim: int = 64  # channels of the encoder output the quantizer takes and lookup() returns
    commitment: float = 0.25  # beta in the VQ-VAE loss ("ema", "factorized")
    decay: float = 0.99  # "ema": EMA decay of cluster sizes and sums
    eps: float = 1e-5  # "ema": Laplace smoothing of cluster sizes
    # "ema": a code whose EMA cluster size falls below this is restarted from a current encoder output.
    dead_threshold: float = 0.25
    kind: str = "ema"  # one of KINDS
    gradient: str = "ste"  # one of GRADIENTS: how the gradient crosses the quantization
    code_dim: int = 8  # "factorized": dimension of the l2-normalised code space
    fsq_levels: tuple[int, ...] = (8, 8, 8)  # "fsq": levels per dimension (8*8*8 = 512 codes)

    def __post_init__(self):
        # Configs come back from JSON with lists for tuples.
        self.fsq_levels = tuple(int(n) for n in self.fsq_levels)
        if self.kind not in KINDS:
            raise ValueError(f"quantizer kind must be one of {KINDS}, got {self.kind!r}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"quantizer gradient must be one of {GRADIENTS}, got {self.gradient!r}")
        if self.kind == "fsq":
            if not self.fsq_levels or min(self.fsq_levels) < 2:
                raise ValueError(f"fsq_levels must be a non-empty list of integers >= 2, got {self.fsq_levels}")
            if math.prod(self.fsq_levels) != self.num_codes:
                raise ValueError(f"fsq: num_codes ({self.num_codes}) must equal the product of fsq_levels "
                                 f"{self.fsq_levels} = {math.prod(self.fsq_levels)}")


# --- gradients across the quantization ----------------------------------------------------------
def straight_through(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value q (up to rounding), gradient copied unchanged to e (van den Oord et al. 2017)."""
    return e + (q - e).detach()


def rotate_to(e: torch.Tensor, q: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024): value exactly q, gradient through ``scale * R``.

    Per vector along ``dim``, R is the rotation taking e/|e| to q/|q| in the plane they span and
    scale = |q|/|e|, both treated as constants: R = I - 2 r r^T + 2 q^ e^T, with e^ = e/|e|,
    q^ = q/|q| and r = (e^ + q^)/|e^ + q^| (two Householder reflections). The forward value
    scale * R e equals q, and the gradient reaching e is scale * R^T g instead of g, so it keeps the
    angle between the output gradient and the code vector. R is applied without forming it:
    R e = e - 2 (e.r) r + 2 (e.e^) q^.

    Where e or q has norm below ``eps`` there is no direction to rotate (and |q|/|e| would be 0 or
    huge), so those vectors get the straight-through gradient: with FSQ every vector that rounds to
    the origin, which at initialisation is nearly all of them.
    """
    if not (torch.is_grad_enabled() and e.requires_grad):
        return q.detach()  # the value is all that is asked (eval, export): skip the unused work
    with torch.no_grad():
        e_norm = e.norm(dim=dim, keepdim=True)
        q_norm = q.norm(dim=dim, keepdim=True)
        ok = (e_norm > eps) & (q_norm > eps)
        e_hat = torch.where(ok, e / e_norm.clamp_min(eps), 0.0)
        q_hat = torch.where(ok, q / q_norm.clamp_min(eps), 0.0)
        r = F.normalize(e_hat + q_hat, dim=dim, eps=eps)  # 0 where not ok: R = I there
        scale = torch.where(ok, q_norm / e_norm.clamp_min(eps), 1.0)
    rotated = e - 2 * (e * r).sum(dim, keepdim=True) * r + 2 * (e * e_hat).sum(dim, keepdim=True) * q_hat
    rotated = scale * rotated
    # rotated equals q only up to rounding; this form makes the value exactly q with rotated's gradient.
    return q.detach() + (rotated - rotated.detach())


def apply_gradient(kind: str, e: torch.Tensor, q: torch.Tensor, dim: int) -> torch.Tensor:
    """The quantizer output: value q, gradient to e as chosen by ``QuantizerConfig.gradient``."""
    return rotate_to(e, q, dim=dim) if kind == "rotation" else straight_through(e, q)


# --- shared pieces ---------------------------------------------------------------------------------
def _flat(z: torch.Tensor) -> torch.Tensor:
    """[B, D, H, W] -> [B*H*W, D]."""
    d = z.shape[1]
    return z.permute(0, 2, 3, 1).reshape(-1, d)


def _grid(flat: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """[B*H*W, D] -> [B, D, H, W]."""
    return flat.view(b, h, w, -1).permute(0, 3, 1, 2)


def _usage_stats(codes: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    usage = torch.bincount(codes.flatten(), minlength=num_codes).to(torch.float32)
    probs = usage / usage.sum()
    return usage, torch.exp(-(probs * torch.log(probs + 1e-10)).sum())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Under DDP, sum EMA statistics over all processes, so every rank makes the same update."""
    if _distributed():
        for t in tensors:
            torch.distributed.all_reduce(t)


def _broadcast_from_first(*tensors: torch.Tensor) -> None:
    """Under DDP, take rank 0's values (codes drawn from one rank's encoder outputs)."""
    if _distributed():
        for t in tensors:
            torch.distributed.broadcast(t, 0)


def _autocast_off(t: torch.Tensor):
    device = t.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


class Quantizer(nn.Module):
    """Base of the quantizers: runs ``quantize`` in float32 with autocast off (see module doc)."""

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config

    def forward(self, z: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
        """Quantize ``z`` [B, D, H, W]; see the module docstring for the returned dict."""
        with _autocast_off(z):
            # Half precision is raised to float32; float32 and float64 inputs are used as they are.
            out = self.quantize(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, training)
        if out["quantized"].dtype != z.dtype:  # no Cast node in float32 exports
            out["quantized"] = out["quantized"].to(z.dtype)
        return out

    def quantize(self, z: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def codes_for(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices int64 [B, H, W] for z of shape [B, D, H, W]."""
        raise NotImplementedError

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors [B, D, H, W] for indices [B, H, W]."""
        raise NotImplementedError


# --- "ema": VQ-VAE with an EMA codebook ------------------------------------------------------------
class VectorQuantizerEMA(Quantizer):
    """Nearest-code quantizer with an EMA codebook (VQ-VAE, van den Oord et al. 2017, appendix A.1).

    The codebook is a buffer, not a parameter: it moves only by exponential moving averages of
    the encoder outputs assigned to each code, so it never receives a gradient. The encoder gets
    the straight-through (or rotated) gradient plus a commitment loss pulling it towards its codes.
    EMA updates, data initialisation and dead-code restarts happen only when ``training`` is True.
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__(config)
        k, d = config.num_codes, config.dim
        self.register_buffer("embedding", torch.randn(k, d) * 0.1)
        self.register_buffer("cluster_size", torch.zeros(k))
        self.register_buffer("embed_sum", self.embedding.clone())
        self.register_buffer("initialized", torch.tensor(False))

    def distances(self, flat: torch.Tensor) -> torch.Tensor:
        """Squared distances [N, K] by the expansion |z|^2 - 2 z.e + |e|^2 (one matmul)."""
        e = self.embedding
        return flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None, :]

    def codes_for(self, z: torch.Tensor) -> torch.Tensor:
        b, _, h, w = z.shape
        return self.distances(_flat(z)).argmin(1).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.embedding).permute(0, 3, 1, 2)

    def quantize(self, z: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
        b, _, h, w = z.shape
        flat = _flat(z)
        if training and not bool(self.initialized):
            self._init_from_data(flat.detach())
        codes = self.distances(flat).argmin(1)
        usage, perplexity = _usage_stats(codes, self.config.num_codes)
        if training:
            self._ema_update(flat.detach(), codes, usage)
        quantized = self.lookup(codes.view(b, h, w))
        loss = self.config.commitment * F.mse_loss(z, quantized.detach())
        quantized = apply_gradient(self.config.gradient, z, quantized, dim=1)
        return {"quantized": quantized, "codes": codes.view(b, h, w), "loss": loss,
                "perplexity": perplexity, "usage": usage}

    @torch.no_grad()
    def _init_from_data(self, flat: torch.Tensor) -> None:
        # Starting from encoder outputs avoids the codes that random init leaves dead forever.
        idx = torch.randint(0, flat.shape[0], (self.config.num_codes,), device=flat.device)
        self.embedding.copy_(flat[idx])
        self.embed_sum.copy_(flat[idx])
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)
        _broadcast_from_first(self.embedding, self.embed_sum)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor, usage: torch.Tensor) -> None:
        c = self.config
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat)
        if _distributed():
            usage = usage.clone()  # the caller's batch usage stays this rank's
            _all_reduce_sum(usage, sums)
        self.cluster_size.mul_(c.decay).add_(usage, alpha=1 - c.decay)
        self.embed_sum.mul_(c.decay).add_(sums, alpha=1 - c.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + c.eps) / (n + c.num_codes * c.eps) * n
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        self._restart_dead(flat)

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor) -> None:
        dead = self.cluster_size < self.config.dead_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        idx = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        # Small noise keeps two restarted codes drawn from one vector from staying identical.
        fresh = flat[idx] + 0.01 * flat.std() * torch.randn_like(flat[idx])
        self.embedding[dead] = fresh
        self.embed_sum[dead] = fresh
        self.cluster_size[dead] = 1.0
        # Every rank has the same dead codes (equal cluster sizes); all take rank 0's restarts.
        _broadcast_from_first(self.embedding, self.embed_sum)


# --- "factorized": low-dimensional l2-normalised codes ---------------------------------------------
class FactorizedQuantizer(Quantizer):
    """Factorised, l2-normalised codes (Yu et al. 2022, ViT-VQGAN; Sun et al. 2024, LlamaGen).

    z [B, dim, H, W] is projected to ``code_dim`` channels and l2-normalised; codes are the
    l2-normalised rows of a codebook, the nearest code is the one of highest cosine, and the
    chosen code is projected back up to ``dim``. The small normalised space is what keeps most
    codes in use without EMA, data init or restarts.

    The codebook is a learned parameter trained by the codebook loss |sg(u) - c|^2 (plus the
    commitment loss beta |u - sg(c)|^2 for the encoder), not an EMA: that is the recipe both papers
    report their usage figures with; an EMA mean of unit vectors is not a unit vector, so it would
    need renormalising after every update, and the projections are learned by the optimiser anyway.
    ``training`` changes nothing here (no state moves outside the optimiser).
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__(config)
        self.proj_in = nn.Linear(config.dim, config.code_dim)
        self.proj_out = nn.Linear(config.code_dim, config.dim)
        self.codebook = nn.Parameter(torch.randn(config.num_codes, config.code_dim))  # uniform directions

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """[B, dim, H, W] -> unit vectors [B*H*W, code_dim]."""
        return F.normalize(self.proj_in(_flat(z)), dim=1)

    def codes_for(self, z: torch.Tensor) -> torch.Tensor:
        b, _, h, w = z.shape
        return (self.project(z) @ self.normalized_codebook().t()).argmax(1).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return self.proj_out(F.embedding(codes, self.normalized_codebook())).permute(0, 3, 1, 2)

    def quantize(self, z: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
        b, _, h, w = z.shape
        u = self.project(z)
        book = self.normalized_codebook()
        codes = (u @ book.t()).argmax(1)
        c = F.embedding(codes, book)
        loss = F.mse_loss(c, u.detach()) + self.config.commitment * F.mse_loss(u, c.detach())
        quantized = _grid(self.proj_out(apply_gradient(self.config.gradient, u, c, dim=1)), b, h, w)
        usage, perplexity = _usage_stats(codes, self.config.num_codes)
        return {"quantized": quantized, "codes": codes.view(b, h, w), "loss": loss,
                "perplexity": perplexity, "usage": usage}


# --- "fsq": finite scalar quantization ---------------------------------------------------------------
class FiniteScalarQuantizer(Quantizer):
    """Finite scalar quantization (Mentzer et al. 2023): no codebook, no auxiliary loss.

    z is projected to ``len(fsq_levels)`` channels; channel i is bounded by a shifted tanh to
    L_i values and rounded to an integer, scaled to [-1, 1] and projected back up to ``dim``. The
    code is the mixed-radix number of the rounded digits, channel 0 least significant, so
    num_codes = prod(fsq_levels). The STE is the paper's gradient; with gradient="rotation" the
    rotation acts on the scaled vectors (origin at the grid's centre), and positions that round to
    the origin get the STE (see ``rotate_to``).
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__(config)
        levels = torch.tensor(config.fsq_levels, dtype=torch.int64)
        n = len(config.fsq_levels)
        self.proj_in = nn.Linear(config.dim, n)
        self.proj_out = nn.Linear(n, config.dim)
        # All derived from the config: not in the state dict.
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.int64), levels[:-1]]), 0)
        half_levels = (levels - 1).float() * (1 + 1e-3) / 2
        offset = (levels % 2 == 0).float() * 0.5  # even L: values -L/2 .. L/2 - 1
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("half_width", (levels // 2).float(), persistent=False)
        self.register_buffer("half_levels", half_levels, persistent=False)
        self.register_buffer("offset", offset, persistent=False)
        self.register_buffer("shift", torch.atanh(offset / half_levels), persistent=False)

    def bound(self, flat: torch.Tensor) -> torch.Tensor:
        """[N, dim] -> [N, len(levels)]: channel i rounds to the L_i integers -(L_i // 2) .. (L_i - 1) // 2."""
        return torch.tanh(self.proj_in(flat) + self.shift) * self.half_levels - self.offset

    def digits_to_codes(self, digits: torch.Tensor) -> torch.Tensor:
        """Integer digits [..., n] in [0, L_i) -> mixed-radix codes [...]."""
        return (digits * self.basis).sum(-1)

    def codes_to_digits(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [...] -> digits [..., n], digit i in [0, L_i)."""
        return torch.remainder(torch.div(codes.unsqueeze(-1), self.basis, rounding_mode="floor"), self.levels)

    def codes_for(self, z: torch.Tensor) -> torch.Tensor:
        b, _, h, w = z.shape
        digits = (torch.round(self.bound(_flat(z))) + self.half_width).long()
        return self.digits_to_codes(digits).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        scaled = (self.codes_to_digits(codes).float() - self.half_width) / self.half_width
        return self.proj_out(scaled).permute(0, 3, 1, 2)

    def quantize(self, z: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
        b, _, h, w = z.shape
        e = self.bound(_flat(z))
        rounded = torch.round(e)
        codes = self.digits_to_codes((rounded + self.half_width).long())
        q = apply_gradient(self.config.gradient, e / self.half_width, rounded / self.half_width, dim=1)
        usage, perplexity = _usage_stats(codes, self.config.num_codes)
        return {"quantized": _grid(self.proj_out(q), b, h, w), "codes": codes.view(b, h, w),
                "loss": z.new_zeros(()), "perplexity": perplexity, "usage": usage}


QUANTIZERS: dict[str, type[Quantizer]] = {
    "ema": VectorQuantizerEMA, "factorized": FactorizedQuantizer, "fsq": FiniteScalarQuantizer,
}


def make_quantizer(config: QuantizerConfig) -> Quantizer:
    """The quantizer of ``config.kind``."""
    if config.kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer kind {config.kind!r}, expected one of {tuple(QUANTIZERS)}")
    return QUANTIZERS[config.kind](config)
