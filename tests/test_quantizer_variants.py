"""The quantizer kinds ("ema", "factorized", "fsq") and gradients ("ste", "rotation") behind one contract."""
import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from models import (
    VQVAE2,
    FactorizedQuantizer,
    FiniteScalarQuantizer,
    QuantizerConfig,
    VectorQuantizerEMA,
    VQVAEConfig,
    make_quantizer,
    rotate_to,
)

KIND_CONFIGS = {
    "ema": {"kind": "ema", "num_codes": 16, "dim": 8},
    "factorized": {"kind": "factorized", "num_codes": 16, "dim": 8, "code_dim": 4},
    "fsq": {"kind": "fsq", "num_codes": 24, "dim": 8, "fsq_levels": (3, 4, 2)},
}
CONTRACT_KEYS = {"quantized", "codes", "loss", "perplexity", "usage"}


def quantizer(kind, seed=0, **overrides):
    torch.manual_seed(seed)
    return make_quantizer(QuantizerConfig(**{**KIND_CONFIGS[kind], **overrides}))


def tiny_vqvae(kind, gradient="ste", seed=0):
    torch.manual_seed(seed)
    qc = QuantizerConfig(**KIND_CONFIGS[kind], gradient=gradient)
    return VQVAE2(VQVAEConfig(channels=16, res_channels=8, res_blocks=1, top=qc, bottom=qc))


# --- config and factory ----------------------------------------------------------------------------
def test_old_configs_build_the_ema_quantizer_with_the_old_state_dict():
    old = {"num_codes": 16, "dim": 8, "commitment": 0.25, "decay": 0.99, "eps": 1e-5, "dead_threshold": 0.25}
    qc = QuantizerConfig(**old)
    assert (qc.kind, qc.gradient) == ("ema", "ste")
    assert type(make_quantizer(qc)) is VectorQuantizerEMA
    model = VQVAE2(VQVAEConfig(channels=16, res_channels=8, res_blocks=1, top=dict(old), bottom=dict(old)))
    quant_keys = {k for k in model.state_dict() if k.startswith("quant_")}
    assert quant_keys == {f"quant_{lv}.{b}" for lv in ("top", "bottom")
                          for b in ("embedding", "cluster_size", "embed_sum", "initialized")}


@pytest.mark.parametrize("kind", KIND_CONFIGS)
def test_configs_survive_a_json_round_trip(kind):
    qc = QuantizerConfig(**KIND_CONFIGS[kind], gradient="rotation")
    back = VQVAEConfig(**json.loads(json.dumps(asdict(VQVAEConfig(top=qc, bottom=qc)))))
    assert back.top == qc and back.bottom == qc and isinstance(back.top.fsq_levels, tuple)


def test_config_rejects_unknown_kinds_gradients_and_inconsistent_fsq():
    with pytest.raises(ValueError, match="kind"):
        QuantizerConfig(kind="gumbel")
    with pytest.raises(ValueError, match="gradient"):
        QuantizerConfig(gradient="identity")
    with pytest.raises(ValueError, match="product"):
        QuantizerConfig(kind="fsq", num_codes=64, fsq_levels=(8, 8, 8))
    assert make_quantizer(QuantizerConfig(kind="fsq")).config.num_codes == 512  # defaults: 8*8*8


@pytest.mark.parametrize("kind", KIND_CONFIGS)
def test_every_kind_keeps_the_contract(kind):
    q = quantizer(kind)
    z = torch.randn(2, 8, 3, 5)
    out = q(z, training=True)
    assert set(out) == CONTRACT_KEYS
    k = q.config.num_codes
    assert out["codes"].dtype == torch.int64 and out["codes"].shape == (2, 3, 5)
    assert 0 <= int(out["codes"].min()) and int(out["codes"].max()) < k
    assert out["quantized"].shape == z.shape and out["quantized"].dtype == z.dtype
    assert out["loss"].shape == () and out["usage"].shape == (k,) and float(out["usage"].sum()) == 30
    assert 1.0 <= float(out["perplexity"]) <= k
    q.eval()
    assert torch.equal(q.codes_for(z), q(z, training=False)["codes"])
    assert torch.allclose(q.lookup(out["codes"]), out["quantized"], atol=1e-5)


@pytest.mark.parametrize("kind", KIND_CONFIGS)
def test_no_state_moves_outside_training(kind):
    q = quantizer(kind)
    q(torch.randn(2, 8, 4, 4), training=True)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(2, 8, 4, 4), training=False)
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in eval mode"


# --- nearest codes against brute force -------------------------------------------------------------
def test_factorized_nearest_code_is_the_highest_cosine_in_the_projected_space():
    q = quantizer("factorized", num_codes=37, code_dim=5)
    assert isinstance(q, FactorizedQuantizer)
    z = torch.randn(3, 8, 4, 6)
    with torch.no_grad():
        projected = q.proj_in(z.permute(0, 2, 3, 1).reshape(-1, 8))
        cos = torch.stack([F.cosine_similarity(v[None], q.codebook, dim=1) for v in projected])
        brute = cos.argmax(1).view(3, 4, 6)
        out = q(z, training=False)
    assert torch.equal(out["codes"], brute)
    # quantized is the unit-norm code projected back up.
    unit_codes = q.codebook[brute] / q.codebook[brute].norm(dim=-1, keepdim=True)
    assert torch.allclose(out["quantized"], q.proj_out(unit_codes).permute(0, 3, 1, 2), atol=1e-5)


def test_fsq_rounds_each_dimension_and_numbers_codes_mixed_radix():
    levels = (3, 4, 5)
    q = quantizer("fsq", num_codes=60, fsq_levels=levels)
    assert isinstance(q, FiniteScalarQuantizer)
    z = torch.randn(4, 8, 5, 5) * 3
    with torch.no_grad():
        bounded = q.bound(z.permute(0, 2, 3, 1).reshape(-1, 8))
        codes = q(z, training=False)["codes"].flatten().tolist()
    seen_digits = [set() for _ in levels]
    for vec, code in zip(bounded.tolist(), codes):
        index, radix = 0, 1
        for i, (v, n) in enumerate(zip(vec, levels)):
            digit = round(v) + n // 2  # Python rounds half to even, as torch.round does
            assert abs(v - round(v)) <= 0.5 and 0 <= digit < n
            seen_digits[i].add(digit)
            index += digit * radix
            radix *= n
        assert code == index
    assert [len(s) for s in seen_digits] == list(levels), "inputs should reach every level of every digit"


def test_fsq_index_and_code_round_trip():
    levels = (3, 4, 5)
    q = quantizer("fsq", num_codes=60, fsq_levels=levels)
    every = torch.arange(60)
    digits = q.codes_to_digits(every)
    assert torch.equal(q.digits_to_codes(digits), every)
    assert len({tuple(d) for d in digits.tolist()}) == 60
    assert (digits >= 0).all() and (digits < torch.tensor(levels)).all()
    # Codes -> scaled values -> nearest-code search gives the codes back (values on the grid round to themselves).
    scaled = (digits.float() - q.half_width) / q.half_width
    assert torch.equal(torch.round(scaled * q.half_width) + q.half_width, digits.float())
    assert scaled.min() == -1 and scaled.max() == 1  # odd levels reach both ends; even ones stop below 1


# --- gradients -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KIND_CONFIGS)
@pytest.mark.parametrize("gradient", ["ste", "rotation"])
def test_gradient_reaches_the_encoder(kind, gradient):
    model = tiny_vqvae(kind, gradient)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x, training=True)
    # Reconstruction loss only: without a gradient across the quantization, none reaches the encoder.
    ((out["recon"] - x) ** 2).mean().backward()
    assert model.enc_bottom[0].weight.grad.abs().sum() > 0
    assert model.enc_top[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("gradient", ["ste", "rotation"])
def test_ema_codebook_takes_no_gradient(gradient):
    q = quantizer("ema", gradient=gradient)
    assert not any(p is q.embedding for p in q.parameters()) and not q.embedding.requires_grad
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = q(z, training=True)
    (out["quantized"].sum() + out["loss"]).backward()
    assert q.embedding.grad is None and z.grad.abs().sum() > 0


def test_factorized_codebook_learns_from_the_codebook_loss_only():
    q = quantizer("factorized")
    out = q(torch.randn(2, 8, 3, 3), training=True)
    out["quantized"].sum().backward(retain_graph=True)
    assert q.codebook.grad is None or not q.codebook.grad.any()
    assert q.proj_in.weight.grad.abs().sum() > 0  # through the straight-through estimator
    out["loss"].backward()
    assert q.codebook.grad.abs().sum() > 0


def test_rotation_forward_value_is_exactly_the_code():
    torch.manual_seed(0)
    e = torch.randn(50, 6, requires_grad=True)
    q = torch.randn(50, 6)
    assert torch.equal(rotate_to(e, q), q)
    vq = quantizer("ema", gradient="rotation")
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = vq(z, training=False)
    assert torch.equal(out["quantized"], vq.embedding[out["codes"]].permute(0, 3, 1, 2))


def test_rotation_falls_back_to_straight_through_at_zero_vectors():
    e = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], requires_grad=True)
    q = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, -1.0]])
    g = torch.randn(2, 3)
    out = rotate_to(e, q)
    assert torch.equal(out, q)
    (out * g).sum().backward()
    assert torch.equal(e.grad, g)


def householder(v):
    v = v / v.norm()
    return torch.eye(len(v), dtype=v.dtype) - 2 * torch.outer(v, v)


def test_rotation_gradient_is_the_transposed_rotation_of_the_output_gradient():
    e = torch.tensor([0.6, -1.2, 2.0], dtype=torch.float64)
    q = torch.tensor([1.5, 0.3, -0.4], dtype=torch.float64)
    g = torch.tensor([0.7, -0.2, 1.1], dtype=torch.float64)
    e_hat, q_hat = e / e.norm(), q / q.norm()
    # By hand: reflect e^ onto -q^ across the bisector, then -q^ onto q^: a rotation taking e^ to q^.
    rot = householder(q_hat) @ householder(e_hat + q_hat)
    assert torch.allclose(rot @ e_hat, q_hat)
    assert torch.allclose(rot.T @ rot, torch.eye(3, dtype=torch.float64))
    assert torch.isclose(torch.linalg.det(rot), torch.tensor(1.0, dtype=torch.float64))
    scale = q.norm() / e.norm()
    expected = scale * rot.T @ g

    leaf = e.clone().requires_grad_(True)
    (rotate_to(leaf[None], q[None]) * g).sum().backward()
    assert torch.allclose(leaf.grad, expected)
    assert not torch.allclose(leaf.grad, g, atol=0.1)  # not the straight-through identity

    # Through the EMA quantizer: z at one position, the codebook holding q and a far code.
    vq = quantizer("ema", num_codes=2, dim=3, gradient="rotation").double()
    vq.embedding.copy_(torch.stack([q, -10 * q]))
    z = e.view(1, 3, 1, 1).clone().requires_grad_(True)
    out = vq(z, training=False)
    assert int(out["codes"]) == 0
    (out["quantized"] * g.view(1, 3, 1, 1)).sum().backward()
    assert torch.allclose(z.grad.flatten(), expected)


# --- mixed precision -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KIND_CONFIGS)
def test_vqvae_trains_under_bf16_autocast(kind):
    model = tiny_vqvae(kind)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, training=True)
        loss = F.mse_loss(out["recon"].float(), x) + out["commitment"]
    loss.backward()
    assert torch.isfinite(loss)
    for level in out["levels"].values():
        assert level["quantized"].dtype == torch.bfloat16  # the input's dtype under autocast
        assert level["codes"].dtype == torch.int64
    assert model.enc_bottom[0].weight.grad.abs().sum() > 0
    for name, buf in model.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == torch.float32, f"{name} is {buf.dtype}"
    if kind == "ema":
        assert bool(model.quant_bottom.initialized) and model.quant_bottom.cluster_size.sum() > 0


@pytest.mark.parametrize("kind", KIND_CONFIGS)
def test_code_search_runs_in_float32_under_autocast(kind):
    q = quantizer(kind)
    q(torch.randn(4, 8, 8, 8), training=True)
    z = (torch.randn(4, 8, 16, 16) * 4).to(torch.bfloat16)  # bf16 distances flip a few of these 1024 codes
    expected = q(z.float(), training=False)["codes"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q(z, training=False)["codes"], expected)


def test_fsq_has_no_codebook_or_loss():
    q = quantizer("fsq")
    assert not any("codebook" in n or "embedding" in n for n, _ in q.named_parameters())
    assert set(q.state_dict()) == {"proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias"}
    assert float(q(torch.randn(1, 8, 2, 2), training=True)["loss"]) == 0.0
    assert math.prod(q.config.fsq_levels) == q.config.num_codes
