"""Export parity: ONNX Runtime must reproduce what PyTorch computed, before a manifest is written.

The exporter (``training.export``) traces the graphs and computes a ``Reference`` in PyTorch; this
module runs the written graphs through the same sessions the service uses and compares. Training
gets ``check`` passed in (``vqtok export`` does that), so it never imports the runtime itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.bundle import DECODER, ENCODER, prior_graph
from service.runtime.sampler import teacher_forcing
from service.runtime.session import open_session


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the export tolerances."""


@dataclass(frozen=True)
class Tolerances:
    code_agreement: float = 0.995  # fraction of code positions that must match
    pixel: int = 1  # max |difference| of decoded uint8 pixels for identical codes
    logits: float = 1e-4  # max |difference| of prior logits
    step_images: int = 2  # teacher forcing runs one ORT call per position: a couple of grids suffice

    def violation(self, key: str, value: float) -> str | None:
        """Why a parity report's ``key`` = ``value`` is outside these tolerances, or None: the one rule
        for the export's check and for a server judging a bundle's recorded report."""
        if key.startswith("code_agreement") and value < self.code_agreement:
            return f"{key} = {value} is below {self.code_agreement}"
        if key == "decoder_max_pixel_diff" and value > self.pixel:
            return f"{key} = {value} is over {self.pixel}"
        if key.endswith("logit_diff") and value > self.logits:
            return f"{key} = {value} is over {self.logits}"
        return None


@dataclass
class Reference:
    """PyTorch's answers on held-out check images, level names in manifest order."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    codes: dict[str, np.ndarray]  # level -> int64 [N, h, w], the encoder's
    pixels: np.ndarray  # uint8 [N, H, W, 3], the decoder's for ``codes``
    prior_logits: dict[str, np.ndarray]  # level -> float32 [N, K, h, w] on ``codes``
    prior_inputs: dict[str, list[str]]  # level -> the prior graph's inputs (level names)


def check(files: dict[str, Path], sampling: dict[str, Any], reference: dict[str, Any],
          tol: Tolerances = Tolerances()) -> dict[str, Any]:
    """The parity report; raises ParityError past a tolerance. ``reference`` holds ``Reference``'s
    fields (a plain dict, so the exporter needs nothing from this package)."""
    ref = Reference(**reference)
    report: dict[str, Any] = {"images": len(ref.images), "checked_with_onnxruntime": ort.__version__}
    encoder = open_session(files[ENCODER])
    outputs = [o.name for o in encoder.get_outputs()]
    got_codes = dict(zip(outputs, encoder.run(None, {"images": np.ascontiguousarray(ref.images)})))
    for name, expected in ref.codes.items():
        agreement = float((expected == got_codes[name]).mean())
        report[f"code_agreement_{name}"] = agreement
        if tol.violation(f"code_agreement_{name}", agreement):
            raise ParityError(f"encoder: {name} codes agree at {agreement:.4%} of positions, "
                              f"need >= {tol.code_agreement:.1%}")
    decoder = open_session(files[DECODER])
    pixels = decoder.run(None, {i.name: ref.codes[i.name] for i in decoder.get_inputs()})[0]
    report["decoder_max_pixel_diff"] = int(np.abs(pixels.astype(np.int16) - ref.pixels.astype(np.int16)).max())
    if tol.violation("decoder_max_pixel_diff", report["decoder_max_pixel_diff"]):
        raise ParityError(f"decoder: pixels differ by {report['decoder_max_pixel_diff']}/255 for identical codes")
    for level, expected in ref.prior_logits.items():
        graph = prior_graph(level)
        got = open_session(files[graph]).run(None, {i: ref.codes[i] for i in ref.prior_inputs[level]})[0]
        _within(report, f"{graph}_max_logit_diff", np.abs(expected - got).max(), tol, graph)
        if level in sampling:
            info = sampling[level]
            sessions = {g: open_session(files[g]) for g in (info.get("cond"), info["row"], info["pixel"]) if g}
            n = tol.step_images
            cond_inputs = [i for i in ref.prior_inputs[level] if i != level]
            cond = ref.codes[cond_inputs[0]][:n] if info.get("cond") and cond_inputs else None
            tf = teacher_forcing(sessions, info, ref.codes[level][:n], cond)
            _within(report, f"{graph}_step_max_logit_diff", np.abs(expected[:n] - tf).max(), tol,
                    f"{graph} step graphs (teacher forcing)")
    return report


def _within(report: dict[str, Any], key: str, diff: float, tol: Tolerances, what: str) -> None:
    report[key] = float(diff)
    if tol.violation(key, diff):
        raise ParityError(f"{what}: logits differ from PyTorch by {diff:.2e} (tolerance {tol.logits:.0e})")


def recorded_problem(parity: Any, tol: Tolerances = Tolerances()) -> str | None:
    """Why a bundle's recorded parity report (its manifest's ``parity``) does not vouch for it, or None.

    The references are PyTorch's, computed at export, so a server cannot rerun the check; it refuses a
    bundle whose manifest records none, or one outside the tolerances."""
    if not isinstance(parity, dict) or not parity:
        return "its manifest records no parity check (export it with vqtok export)"
    problems = (tol.violation(k, v) for k, v in parity.items() if isinstance(v, (int, float)))
    problem = next((p for p in problems if p), None)
    return f"parity {problem}" if problem else None
