"""Export trained models to a bundle (ONNX graphs + manifest.json) and check it against PyTorch.

The graphs take and return what a service has at hand: uint8 NHWC images and int64 code grids.
Normalisation, clamping and rounding happen inside the graphs so no client re-implements them.

The parity check runs the graphs in ONNX Runtime, which belongs to the service's runtime package;
training computes PyTorch's reference answers and takes the checker as an argument (``vqtok
export`` passes ``service.runtime.parity.check``), so it imports nothing of the service but the
bundle contract.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from models import VQVAE2, GatedPixelCNN
from service.bundle import DECODER, ENCODER, FORMAT_VERSION, MANIFEST, Bundle, prior_graph, sha256_file
from training.data import portable_paths
from training.export_steps import export_sampling_graphs
from training.onnx_graph import OPSET, export_onnx

# (files by graph name, the manifest's sampling section, PyTorch's reference answers) -> parity report;
# raises when ONNX Runtime disagrees. See ``service.runtime.parity.check``.
ParityCheck = Callable[[dict[str, Path], dict[str, Any], dict[str, Any]], dict[str, float]]


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return images.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], clamped and rounded."""
    return ((x + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)


class EncoderGraph(nn.Module):
    def __init__(self, vqvae: VQVAE2):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, images: torch.Tensor):
        levels = self.vqvae.encode(to_model_input(images), training=False)
        return tuple(levels[name]["codes"] for name in self.vqvae.config.level_names)


class DecoderGraph(nn.Module):
    def __init__(self, vqvae: VQVAE2):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, *codes: torch.Tensor):
        named = dict(zip(self.vqvae.config.level_names, codes))
        return to_uint8_images(self.vqvae.decode_codes(named["bottom"], named.get("top")))


class PriorGraph(nn.Module):
    def __init__(self, prior: GatedPixelCNN):
        super().__init__()
        self.prior = prior

    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None):
        return self.prior(codes, cond)


def _grid_axes(names: list[str]) -> dict[str, dict[int, str]]:
    return {n: {0: "batch", 1: f"{n}_h", 2: f"{n}_w"} for n in names}


def export_bundle(vqvae: VQVAE2, prior_top: GatedPixelCNN | None, prior_bottom: GatedPixelCNN | None,
                  out_dir: str | Path, image_size: int, check_images: np.ndarray, name: str, *,
                  check: ParityCheck, metrics: dict[str, Any] | None = None,
                  training: dict[str, Any] | None = None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the bundle into ``out_dir`` and return its manifest.

    ``check_images`` are held-out uint8 [N, H, W, 3] images (H, W multiples of 8) on which ONNX
    Runtime must reproduce PyTorch: ``check`` raises on a divergence.

    The bundle is written into a new sibling folder of ``out_dir`` and swapped in only once the
    parity check and a round-trip load (``Bundle.load``, every sha256) pass, so a failed export
    leaves whatever ``out_dir`` held before untouched and no sibling behind.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(out, "exporting")
    staging.mkdir()  # mode from the umask, as the folder it replaces had (not mkdtemp's 0700)
    try:
        manifest = _write_bundle(vqvae, prior_top, prior_bottom, staging, image_size, check_images, name,
                                 check=check, metrics=metrics, training=training, data=data)
        Bundle.load(staging)  # round-trip: the manifest we wrote must verify
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _sibling(out: Path, role: str) -> Path:
    """A fresh name next to ``out`` (same filesystem, so renames between them are atomic)."""
    return out.with_name(f"{out.name}.{role}-{os.getpid()}-{secrets.token_hex(4)}")


def _swap_in(new: Path, out: Path) -> None:
    """Put the folder ``new`` at ``out``: rename the old one aside, rename the new one in, then delete
    the old one. Each rename is atomic; if the second fails, the old folder is renamed back."""
    if not out.exists() and not out.is_symlink():
        new.rename(out)
        return
    aside = _sibling(out, "replaced")
    out.rename(aside)
    try:
        new.rename(out)
    except BaseException:
        aside.rename(out)
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside)
    else:
        aside.unlink()


def _write_bundle(vqvae: VQVAE2, prior_top: GatedPixelCNN | None, prior_bottom: GatedPixelCNN | None, out: Path,
                  image_size: int, check_images: np.ndarray, name: str, *, check: ParityCheck,
                  metrics: dict[str, Any] | None, training: dict[str, Any] | None,
                  data: dict[str, Any] | None) -> dict[str, Any]:
    """Every graph and, once ``check`` passes, the manifest, into the empty folder ``out``."""
    vqvae.eval()
    level_names = vqvae.config.level_names
    priors = {name: p for name, p in zip(level_names, (prior_top, prior_bottom)[-len(level_names):]) if p is not None}
    images = torch.from_numpy(np.ascontiguousarray(check_images[:2]))
    files: dict[str, Path] = {}

    files[ENCODER] = out / "encoder.onnx"
    export_onnx(EncoderGraph(vqvae), (images,), files[ENCODER], ["images"], level_names,
                {"images": {0: "batch", 1: "height", 2: "width"}, **_grid_axes(level_names)})
    with torch.no_grad():
        codes = EncoderGraph(vqvae)(images)
    files[DECODER] = out / "decoder.onnx"
    export_onnx(DecoderGraph(vqvae), tuple(codes), files[DECODER], level_names, ["images"],
                {**_grid_axes(level_names), "images": {0: "batch", 1: "height", 2: "width"}})
    named = dict(zip(level_names, codes))
    inputs = _prior_inputs(level_names, priors)
    for level, prior in priors.items():
        graph = prior_graph(level)
        files[graph] = out / f"{graph}.onnx"
        export_onnx(PriorGraph(prior), tuple(named[i] for i in inputs[level]), files[graph], inputs[level],
                    ["logits"], {**_grid_axes(inputs[level]), "logits": {0: "batch", 2: "h", 3: "w"}})

    # Fast cached sampling (issue 4): per-prior step graphs + their cache shapes, see training/export_steps.py.
    sampling = export_sampling_graphs(priors, inputs, out, files, named)
    parity = check(files, sampling, reference(vqvae, priors, inputs, check_images))
    strides = vqvae.config.strides
    quant = {n: getattr(vqvae.config, n) for n in level_names}  # config fields are named after levels
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "image_size": image_size,
        "levels": [{"name": n, "stride": strides[n], "codebook_size": quant[n].num_codes,
                    "embedding_dim": quant[n].dim} for n in level_names],
        "files": {k: {"path": p.name, "sha256": sha256_file(p)} for k, p in files.items()},
        "onnx": {"opset": OPSET, "producer": f"pytorch {torch.__version__}", "onnx": onnx.__version__},
        "parity": parity,
        **({"sampling": sampling} if sampling else {}),
        # What was trained on and how, with no machine's absolute paths (``portable_paths``).
        **({"data": portable_paths(data)} if data else {}),
        "metrics": portable_paths(metrics or {}),
        "training": portable_paths(training or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _prior_inputs(level_names: list[str], priors: dict[str, GatedPixelCNN]) -> dict[str, list[str]]:
    """Each prior's graph inputs: its own level, then the coarser level when it is conditioned."""
    out = {}
    for i, level in enumerate(level_names):
        if level in priors:
            conditioned = i > 0 and priors[level].config.cond_codes > 0
            out[level] = [level, level_names[i - 1]] if conditioned else [level]
    return out


@torch.no_grad()
def reference(vqvae: VQVAE2, priors: dict[str, GatedPixelCNN], inputs: dict[str, list[str]],
              check_images: np.ndarray) -> dict[str, Any]:
    """PyTorch's answers on the check images, in the fields of ``service.runtime.parity.Reference``."""
    images = np.ascontiguousarray(check_images)
    codes = dict(zip(vqvae.config.level_names, EncoderGraph(vqvae)(torch.from_numpy(images))))
    pixels = DecoderGraph(vqvae)(*codes.values()).numpy()
    logits = {}
    for level, prior in priors.items():
        prior.eval()
        logits[level] = prior(*(codes[i] for i in inputs[level])).numpy()
    return {"images": images, "codes": {k: v.numpy() for k, v in codes.items()}, "pixels": pixels,
            "prior_logits": logits, "prior_inputs": inputs}
