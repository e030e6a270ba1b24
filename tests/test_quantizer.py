import torch

from models import VQVAE2, QuantizerConfig, VectorQuantizerEMA, VQVAEConfig


def make_quantizer(k=16, d=4, seed=0):
    torch.manual_seed(seed)
    q = VectorQuantizerEMA(QuantizerConfig(num_codes=k, dim=d))
    q.embedding.copy_(torch.randn(k, d))
    q.embed_sum.copy_(q.embedding)
    q.cluster_size.fill_(1.0)
    q.initialized.fill_(True)
    return q


def test_nearest_code_matches_brute_force():
    q = make_quantizer(k=37, d=5)
    z = torch.randn(3, 5, 6, 7)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 5)
    brute = torch.stack([((q.embedding - v) ** 2).sum(1).argmin() for v in flat]).view(3, 6, 7)
    out = q(z, training=False)
    assert torch.equal(out["codes"], brute)
    assert torch.allclose(out["quantized"], q.embedding[brute].permute(0, 3, 1, 2))
    assert out["usage"].sum() == flat.shape[0]
    assert 1.0 <= float(out["perplexity"]) <= 37.0


def test_ema_updates_only_in_training_mode():
    q = make_quantizer()
    z = torch.randn(2, 4, 5, 5)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(z, training=False)
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in eval mode"
    q(z, training=True)
    assert not torch.equal(q.embedding, before["embedding"])
    assert not torch.equal(q.cluster_size, before["cluster_size"])


def test_codebook_takes_no_gradient():
    q = make_quantizer()
    assert all(p is not q.embedding for p in q.parameters())
    assert not q.embedding.requires_grad
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z, training=True)
    (out["quantized"].sum() + out["loss"]).backward()
    assert q.embedding.grad is None
    assert z.grad is not None


def test_straight_through_gradient_is_identity_on_quantized():
    q = make_quantizer()
    z = torch.randn(1, 4, 3, 3, requires_grad=True)
    weights = torch.randn(1, 4, 3, 3)
    (q(z, training=False)["quantized"] * weights).sum().backward()
    assert torch.allclose(z.grad, weights)


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    qc = QuantizerConfig(num_codes=16, dim=8)
    model = VQVAE2(VQVAEConfig(channels=16, res_channels=8, res_blocks=1, top=qc, bottom=qc))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x, training=True)
    # Reconstruction loss only: without straight-through, no gradient could cross the argmin.
    ((out["recon"] - x) ** 2).mean().backward()
    first_conv = model.enc_bottom[0]
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    assert model.enc_top[0].weight.grad.abs().sum() > 0


def test_codebook_initialised_from_data():
    torch.manual_seed(0)
    q = VectorQuantizerEMA(QuantizerConfig(num_codes=8, dim=3))
    z = torch.randn(4, 3, 4, 4) * 5 + 100  # far from the random initial codebook
    q(z, training=True)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    # After initialisation every code sits near some encoder output.
    nearest = torch.cdist(q.embedding, flat).min(1).values
    assert nearest.max() < 5.0
    assert bool(q.initialized)


def test_dead_code_restart_revives_unused_codes():
    q = make_quantizer(k=16, d=4)
    dead = torch.arange(8, 16)
    q.embedding[dead] = 1e4  # nothing will ever be assigned to these
    q.embed_sum[dead] = 1e4
    q.cluster_size[dead] = 0.0
    z = torch.randn(4, 4, 8, 8)
    q(z, training=True)
    assert (q.embedding[dead].abs() < 100).all(), "dead codes were not moved to encoder outputs"
    # Revived codes now win assignments.
    used = torch.zeros(16, dtype=torch.bool)
    for _ in range(20):
        used |= q(torch.randn(4, 4, 8, 8), training=True)["usage"] > 0
    assert used[dead].any()
