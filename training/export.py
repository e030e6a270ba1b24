"""Export trained models to a bundle (ONNX graphs + manifest.json) and check it against PyTorch.

The graphs take and return what a service has at hand: uint8 NHWC images and int64 code grids.
Normalisation, clamping and rounding happen inside the graphs so no client re-implements them.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from models import VQVAE2, GatedPixelCNN
from service.bundle import FORMAT_VERSION, MANIFEST, Bundle, sha256_file

OPSET = 17


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the export tolerances."""


@dataclass(frozen=True)
class Tolerances:
    code_agreement: float = 0.995  # fraction of code positions that must match
    pixel: int = 1  # max |difference| of decoded uint8 pixels for identical codes
    logits: float = 1e-4  # max |difference| of prior logits


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


def export_onnx(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                dynamic_axes: dict[str, dict[int, str]]) -> None:
    module.eval()
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))


def ort_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def export_bundle(vqvae: VQVAE2, prior_top: GatedPixelCNN | None, prior_bottom: GatedPixelCNN | None,
                  out_dir: str | Path, image_size: int, check_images: np.ndarray, name: str,
                  metrics: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
                  tolerances: Tolerances = Tolerances()) -> dict[str, Any]:
    """Write the bundle into ``out_dir`` and return its manifest.

    ``check_images`` are held-out uint8 [N, H, W, 3] images (H, W multiples of 8) on which ONNX
    Runtime must reproduce PyTorch; a divergence raises ParityError and leaves no manifest.
    """
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vqvae.eval()
    level_names = vqvae.config.level_names
    images = torch.from_numpy(np.ascontiguousarray(check_images[:2]))
    files: dict[str, Path] = {}

    files["encoder"] = out / "encoder.onnx"
    export_onnx(EncoderGraph(vqvae), (images,), files["encoder"], ["images"], level_names,
                {"images": {0: "batch", 1: "height", 2: "width"}, **_grid_axes(level_names)})
    with torch.no_grad():
        codes = EncoderGraph(vqvae)(images)
    files["decoder"] = out / "decoder.onnx"
    export_onnx(DecoderGraph(vqvae), tuple(codes), files["decoder"], level_names, ["images"],
                {**_grid_axes(level_names), "images": {0: "batch", 1: "height", 2: "width"}})
    named = dict(zip(level_names, codes))
    if prior_top is not None:
        files["prior_top"] = out / "prior_top.onnx"
        export_onnx(PriorGraph(prior_top), (named["top"],), files["prior_top"], ["top"], ["logits"],
                    {**_grid_axes(["top"]), "logits": {0: "batch", 2: "h", 3: "w"}})
    if prior_bottom is not None:
        files["prior_bottom"] = out / "prior_bottom.onnx"
        export_onnx(PriorGraph(prior_bottom), (named["bottom"], named["top"]), files["prior_bottom"],
                    ["bottom", "top"], ["logits"],
                    {**_grid_axes(["bottom", "top"]), "logits": {0: "batch", 2: "h", 3: "w"}})

    # Fast cached sampling (issue 4): per-prior step graphs + their cache shapes, see training/fast_sampling.py.
    sampling = export_sampling_graphs(prior_top, prior_bottom, out, files, named)

    parity = check_parity(vqvae, prior_top, prior_bottom, files, check_images, tolerances)
    parity.update(check_sampling_parity(prior_top, prior_bottom, files, sampling, named, tolerances))
    quant = {"top": vqvae.config.top, "bottom": vqvae.config.bottom}
    strides = vqvae.config.strides
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "image_size": image_size,
        "levels": [{"name": n, "stride": strides[n], "codebook_size": quant[n].num_codes,
                    "embedding_dim": quant[n].dim} for n in level_names],
        "files": {k: {"path": p.name, "sha256": sha256_file(p)} for k, p in files.items()},
        "onnx": {"opset": OPSET, "producer": f"pytorch {torch.__version__}",
                 "onnx": onnx.__version__, "checked_with_onnxruntime": ort.__version__},
        "parity": parity,
        **({"sampling": sampling} if sampling else {}),
        "metrics": metrics or {},
        "training": training or {},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    Bundle.load(out)  # round-trip: the manifest we wrote must verify
    return manifest


@torch.no_grad()
def check_parity(vqvae: VQVAE2, prior_top: GatedPixelCNN | None, prior_bottom: GatedPixelCNN | None,
                 files: dict[str, Path], check_images: np.ndarray, tol: Tolerances) -> dict[str, float]:
    """Compare every graph with PyTorch on the check images; raise ParityError past a tolerance."""
    level_names = vqvae.config.level_names
    images = np.ascontiguousarray(check_images)
    torch_codes = EncoderGraph(vqvae)(torch.from_numpy(images))
    ort_codes = ort_session(files["encoder"]).run(None, {"images": images})
    report: dict[str, float] = {"images": len(images)}
    for name, t, o in zip(level_names, torch_codes, ort_codes):
        agreement = float((t.numpy() == o).mean())
        report[f"code_agreement_{name}"] = agreement
        if agreement < tol.code_agreement:
            raise ParityError(f"encoder: {name} codes agree at {agreement:.4%} of positions, "
                              f"need >= {tol.code_agreement:.1%}")
    feeds = {n: t.numpy() for n, t in zip(level_names, torch_codes)}
    torch_pixels = DecoderGraph(vqvae)(*torch_codes).numpy().astype(np.int16)
    ort_pixels = ort_session(files["decoder"]).run(None, feeds)[0].astype(np.int16)
    report["decoder_max_pixel_diff"] = int(np.abs(torch_pixels - ort_pixels).max())
    if report["decoder_max_pixel_diff"] > tol.pixel:
        raise ParityError(f"decoder: pixels differ by {report['decoder_max_pixel_diff']}/255 for identical codes")
    priors = {"prior_top": (prior_top, ["top"]), "prior_bottom": (prior_bottom, ["bottom", "top"])}
    for graph, (prior, inputs) in priors.items():
        if prior is None:
            continue
        prior.eval()
        expected = prior(*(torch.from_numpy(feeds[i]) for i in inputs)).numpy()
        got = ort_session(files[graph]).run(None, {i: feeds[i] for i in inputs})[0]
        report[f"{graph}_max_logit_diff"] = float(np.abs(expected - got).max())
        if report[f"{graph}_max_logit_diff"] > tol.logits:
            raise ParityError(f"{graph}: logits differ by {report[f'{graph}_max_logit_diff']:.2e} "
                              f"(tolerance {tol.logits:.0e})")
    return report


# --- fast cached sampling (issue 4): step graphs and their teacher-forcing parity -----------------
def export_sampling_graphs(prior_top: GatedPixelCNN | None, prior_bottom: GatedPixelCNN | None, out: Path,
                           files: dict[str, Path], named: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write each prior's row/pixel(/cond) step graphs into ``out``, add them to ``files`` and
    return the manifest's ``sampling`` entry ({level: graph names and cache shapes})."""
    from training.fast_sampling import export_step_graphs

    sampling: dict[str, Any] = {}
    for level, prior in (("top", prior_top), ("bottom", prior_bottom)):
        if prior is not None:
            grid = tuple(named[level].shape[1:])
            cond_grid = tuple(named["top"].shape[1:]) if "top" in named else None
            step_files, sampling[level] = export_step_graphs(prior, out, f"prior_{level}", grid, cond_grid)
            files.update(step_files)
    return sampling


def check_sampling_parity(prior_top: GatedPixelCNN | None, prior_bottom: GatedPixelCNN | None,
                          files: dict[str, Path], sampling: dict[str, Any], named: dict[str, torch.Tensor],
                          tol: Tolerances) -> dict[str, float]:
    """Teacher forcing: the step graphs' logits at every position of the check codes must match the
    full PyTorch forward pass within ``tol.logits``."""
    from training.fast_sampling import check_step_parity

    priors = {}
    for level, prior in (("top", prior_top), ("bottom", prior_bottom)):
        if prior is not None:
            cond = named["top"].numpy() if sampling[level].get("cond") else None
            priors[level] = (prior, named[level].numpy(), cond)
    report = check_step_parity(priors, files, sampling)
    for key, diff in report.items():
        if diff > tol.logits:
            raise ParityError(f"{key.removesuffix('_max_logit_diff')} graphs: teacher-forced logits differ "
                              f"from the full forward pass by {diff:.2e} (tolerance {tol.logits:.0e})")
    return report
