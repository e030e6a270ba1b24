"""PyTorch models rebuilt from a bundle's ONNX weights, to evaluate a shipped bundle with the same
code as a fresh run (``vqtok evaluate --bundle DIR``) when its checkpoints are gone.

``torch.onnx.export`` keeps parameter and buffer names as initializer names ("vqvae.enc_bottom.0.weight",
"prior.layers.0.v_conv.weight"), so the state dicts come back by name; the architecture sizes are
read from the weight shapes. The EMA bookkeeping buffers (cluster sizes, sums) are not in the graphs
and not needed to encode or decode: the rebuilt VQ-VAE is for evaluation only.
"""
from __future__ import annotations

from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from models import VQVAE2, GatedPixelCNN, PixelCNNConfig, QuantizerConfig, VQVAEConfig
from service.bundle import DECODER, ENCODER, Bundle, prior_graph

EVAL_ONLY_BUFFERS = ("cluster_size", "embed_sum")
EMA_START_COUNT = 8.0  # about a 32-image batch's positions per code at K=512 (see warm_start)


def initializers(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    model = onnx.load(str(path))
    return {t.name[len(prefix):]: torch.from_numpy(numpy_helper.to_array(t).copy())
            for t in model.graph.initializer if t.name.startswith(prefix)}


def vqvae_from_bundle(bundle: Bundle) -> VQVAE2:
    state = {**initializers(bundle.path(ENCODER), "vqvae."), **initializers(bundle.path(DECODER), "vqvae.")}
    quant = {n: QuantizerConfig(num_codes=lv.codebook_size, dim=lv.embedding_dim) for n, lv in bundle.levels.items()}
    res = [k for k in state if k.startswith("decoder.") and k.endswith(".body.1.weight")]
    config = VQVAEConfig(levels=len(quant), channels=state["decoder.0.weight"].shape[0], res_blocks=len(res),
                         res_channels=state[res[0]].shape[0], top=quant.get("top", QuantizerConfig()),
                         bottom=quant["bottom"])
    model = VQVAE2(config)
    for name, buf in model.named_buffers():
        if name.endswith("initialized"):
            state[name] = torch.tensor(True)
        elif name.endswith(EVAL_ONLY_BUFFERS):
            state[name] = buf
    model.load_state_dict(state, strict=True)
    return model.eval()


def prior_from_bundle(bundle: Bundle, level: str) -> GatedPixelCNN:
    state = initializers(bundle.path(prior_graph(level)), "prior.")
    num_codes, channels = state["embed.weight"].shape
    v_conv = state["layers.0.v_conv.weight"]
    config = PixelCNNConfig(num_codes=num_codes, channels=channels,
                            layers=len({k.split(".")[1] for k in state if k.startswith("layers.")}),
                            kernel=v_conv.shape[3], head_channels=state["head.1.weight"].shape[0],
                            cond_codes=state["condition.embed.weight"].shape[0] if "condition.embed.weight" in state else 0)
    model = GatedPixelCNN(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def from_bundle(directory: str | Path) -> tuple[VQVAE2, dict[str, GatedPixelCNN], Bundle]:
    bundle = Bundle.load(directory)
    priors = {n: prior_from_bundle(bundle, n) for n in bundle.levels if bundle.has(prior_graph(n))}
    return vqvae_from_bundle(bundle), priors, bundle


def warm_start(model: VQVAE2 | GatedPixelCNN, directory: str | Path, level: str | None = None) -> None:
    """Load a bundle's weights into a model about to be trained (``--init``); the architectures must match.

    The EMA codebooks restart their statistics as if every code had been picked equally often in one
    batch-sized sample (cluster size = ``EMA_START_COUNT``, sums = code x count), so the first
    updates move the codebook by the EMA rate instead of replacing it with one batch's means.
    """
    bundle = Bundle.load(directory)
    source = vqvae_from_bundle(bundle) if level is None else prior_from_bundle(bundle, level)
    if source.config != model.config:
        raise SystemExit(f"--init {directory}: its model {source.config} differs from this run's {model.config}")
    model.load_state_dict(source.state_dict())
    for module in model.modules():
        if hasattr(module, "cluster_size") and hasattr(module, "embed_sum"):
            module.cluster_size.fill_(EMA_START_COUNT)
            module.embed_sum.copy_(module.embedding * EMA_START_COUNT)
