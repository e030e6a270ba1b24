"""Tracing one PyTorch module to one checked ONNX graph: the single export path that the bundle's
graphs (``training.export``) and the fast-sampling step graphs (``training.export_steps``) share."""
from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

OPSET = 17


def export_onnx(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                dynamic_axes: dict[str, dict[int, str]]) -> None:
    module.eval()
    with torch.no_grad():
        # The TorchScript exporter: its graphs are the ones ONNX Runtime's parity checks have passed on.
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))
