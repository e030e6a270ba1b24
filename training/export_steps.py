"""The fast-sampling step graphs: each prior's ``CachedPrior`` steps (``models.cached_prior``) exported
as ONNX graphs with every cache an explicit input and output, and the manifest's ``sampling`` entry
that tells the service's cached sampler (``service.runtime.sampler``) their names and cache shapes.

``training.export`` calls ``export_sampling_graphs`` for every prior of a bundle.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.cached_prior import CachedPrior
from models.pixelcnn import GatedPixelCNN
from service.bundle import prior_graph
from training.onnx_graph import export_onnx


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
        export_onnx(_PixelGraph(cp), (codes[:, 0, 0], torch.tensor([1]), hbias, cp.init_hcache(n)),
                    files[f"{name}_pixel"], ["prev", "col", "hbias", "hcache"], ["logits", "hcache_out"],
                    {"prev": {0: "batch"}, "hbias": {0: "batch", 1: "width"}, "hcache": {0: "batch"},
                     "logits": {0: "batch"}, "hcache_out": {0: "batch"}})
    return files, info


def export_sampling_graphs(priors: dict[str, GatedPixelCNN], inputs: dict[str, list[str]], out: Path,
                           files: dict[str, Path], named: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write each prior's row/pixel(/cond) step graphs into ``out``, add them to ``files`` and
    return the manifest's ``sampling`` entry ({level: graph names and cache shapes})."""
    sampling: dict[str, Any] = {}
    for level, prior in priors.items():
        grid = tuple(named[level].shape[1:])
        cond = inputs[level][1] if len(inputs[level]) > 1 else None
        cond_grid = tuple(named[cond].shape[1:]) if cond else None
        step_files, sampling[level] = export_step_graphs(prior, out, prior_graph(level), grid, cond_grid,
                                                         cond_name=cond or "cond")
        files.update(step_files)
    return sampling
