"""Every quantizer kind exports to the bundle's graph interface and runs in ONNX Runtime like PyTorch.

The graphs are training/export.py's (EncoderGraph: uint8 NHWC images -> int64 codes per level;
DecoderGraph: codes -> uint8 images) through its one export path, so a kind that passes here
exports into an unchanged bundle format.
"""
import numpy as np
import pytest
import torch

from models import VQVAE2, QuantizerConfig, VQVAEConfig
from service.runtime.session import RuntimeConfig, open_session
from training.export import DecoderGraph, EncoderGraph
from training.onnx_graph import export_onnx

CASES = {
    "ema-ste": {"kind": "ema", "num_codes": 16, "dim": 8},
    "ema-rotation": {"kind": "ema", "num_codes": 16, "dim": 8, "gradient": "rotation"},
    "factorized-ste": {"kind": "factorized", "num_codes": 16, "dim": 8, "code_dim": 4},
    "factorized-rotation": {"kind": "factorized", "num_codes": 16, "dim": 8, "code_dim": 4, "gradient": "rotation"},
    "fsq-ste": {"kind": "fsq", "num_codes": 24, "dim": 8, "fsq_levels": (3, 4, 2)},
}


@torch.no_grad()
def spread_codes(vqvae: VQVAE2, x: torch.Tensor) -> None:
    """Untrained encoders give near-constant features, which the factorised and FSQ quantizers send
    to one code; fit their input projections to the features (as the EMA kind's data init does) so
    that the parity check covers many codes."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, args, out: inputs.__setitem__(m, args[0]))
             for m in (vqvae.quant_top, vqvae.quant_bottom)]
    vqvae(x, training=False)
    for h in hooks:
        h.remove()
    for q, z in inputs.items():
        if not hasattr(q, "proj_in"):
            continue
        proj = q.proj_in(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        mean, std = proj.mean(0), proj.std(0) + 1e-6
        scale = 1.0 if q.config.kind == "factorized" else 2.0  # FSQ: spread over the levels
        q.proj_in.weight.mul_(scale / std[:, None])
        q.proj_in.bias.copy_(scale * (q.proj_in.bias - mean) / std)
        if q.config.kind == "factorized":
            projected = torch.nn.functional.normalize(q.proj_in(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])), dim=1)
            q.codebook.copy_(projected[torch.randperm(len(projected))[: q.config.num_codes]])


def export(module, args, path, inputs, outputs, dynamic_axes):
    export_onnx(module, args, path, inputs, outputs, dynamic_axes)
    return open_session(path, RuntimeConfig(device="cpu", intra_op_threads=1))


@pytest.mark.parametrize("case", CASES)
def test_export_gives_the_same_codes_and_images_as_torch(case, tmp_path):
    torch.manual_seed(0)
    qc = QuantizerConfig(**CASES[case])
    vqvae = VQVAE2(VQVAEConfig(channels=16, res_channels=8, res_blocks=1, top=qc, bottom=qc))
    for _ in range(3):  # a few training steps' worth of state (EMA init and updates)
        vqvae(torch.rand(4, 3, 32, 32) * 2 - 1, training=True)
    spread_codes(vqvae, torch.rand(4, 3, 32, 32) * 2 - 1)
    vqvae.eval()
    names = vqvae.config.level_names
    grids = {n: {0: "batch", 1: f"{n}_h", 2: f"{n}_w"} for n in names}
    image_axes = {0: "batch", 1: "height", 2: "width"}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)

    encoder = export(EncoderGraph(vqvae), (torch.from_numpy(images),), tmp_path / "encoder.onnx",
                     ["images"], names, {"images": image_axes, **grids})
    with torch.no_grad():
        codes = EncoderGraph(vqvae)(torch.from_numpy(images))
    decoder = export(DecoderGraph(vqvae), codes, tmp_path / "decoder.onnx", names, ["images"],
                     {**grids, "images": image_axes})

    # Other random images, at another batch size and shape than the export's (dynamic axes).
    for shape in [(3, 32, 32, 3), (1, 48, 40, 3)]:
        batch = rng.integers(0, 256, shape, dtype=np.uint8)
        with torch.no_grad():
            expected = EncoderGraph(vqvae)(torch.from_numpy(batch))
        got = encoder.run(None, {"images": batch})
        for name, t, o in zip(names, expected, got):
            assert o.dtype == np.int64 and o.shape == tuple(t.shape), name
            assert 0 <= o.min() and o.max() < qc.num_codes
            np.testing.assert_array_equal(o, t.numpy(), err_msg=f"{case}: {name} codes")
        if shape[0] == 3:
            assert all(len(np.unique(o)) >= 4 for o in got), "degenerate test: too few distinct codes"

    # The decoder on arbitrary codes (every code's lookup path, not only the ones images produce).
    feeds = {n: rng.integers(0, qc.num_codes, (2, *codes[i].shape[1:]), dtype=np.int64) for i, n in enumerate(names)}
    with torch.no_grad():
        expected = DecoderGraph(vqvae)(*(torch.from_numpy(feeds[n]) for n in names)).numpy()
    got = decoder.run(None, feeds)[0]
    assert got.dtype == np.uint8 and got.shape == expected.shape == (2, 32, 32, 3)
    assert np.abs(got.astype(np.int16) - expected.astype(np.int16)).max() <= 1
