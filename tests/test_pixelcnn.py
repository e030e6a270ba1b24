"""Causality and no blind spot, checked through input gradients."""
import pytest
import torch

from models import GatedPixelCNN, PixelCNNConfig

H = W = 8


def dependency_map(model, x, cond, i, j):
    out = model.forward_embedded(x, cond)
    (grad,) = torch.autograd.grad(out[0, :, i, j].sum(), x)
    return grad[0].abs().sum(0) > 0


@pytest.mark.parametrize("conditioned", [False, True], ids=["top_prior", "bottom_prior"])
@pytest.mark.parametrize("kernel,layers", [(3, 2), (5, 3)])
def test_causal_and_no_blind_spot(conditioned, kernel, layers):
    torch.manual_seed(0)
    cfg = PixelCNNConfig(num_codes=11, channels=8, layers=layers, kernel=kernel, head_channels=16,
                         cond_codes=5 if conditioned else 0)
    model = GatedPixelCNN(cfg)
    x = torch.randn(1, 8, H, W, requires_grad=True)
    cond = model.condition_features(torch.randint(0, 5, (1, 4, 4)), None) if conditioned else None
    for i in range(H):
        for j in range(W):
            depends = dependency_map(model, x, cond, i, j)
            later = torch.zeros(H, W, dtype=torch.bool)
            later.view(-1)[i * W + j:] = True
            assert not depends[later].any(), f"({i},{j}) sees itself or a later position"
            expected = model.receptive_field(H, W, i, j)
            assert torch.equal(depends, expected), f"({i},{j}): blind spot or wrong receptive field"
    # The position above and to the right is the classic blind spot of masked PixelCNNs.
    assert model.receptive_field(H, W, 3, 3)[2, 4]


def test_conditioning_reaches_every_position():
    torch.manual_seed(0)
    model = GatedPixelCNN(PixelCNNConfig(num_codes=11, channels=8, layers=2, kernel=3, head_channels=16,
                                         cond_codes=5, cond_scale=2))
    codes = torch.randint(0, 11, (1, 8, 8))
    cond_codes = torch.randint(0, 5, (1, 4, 4))
    feats = model.condition_features(cond_codes, None).detach().requires_grad_(True)
    x = model.embed(codes).permute(0, 3, 1, 2)
    out = model.forward_embedded(x, feats)
    for i, j in [(0, 0), (3, 5), (7, 7)]:
        (grad,) = torch.autograd.grad(out[0, :, i, j].sum(), feats, retain_graph=True)
        assert grad[0, :, i, j].abs().sum() > 0, "logits ignore the conditioning at their own position"
    # A different top grid changes the bottom prior's logits, also at (0, 0) where no code is seen yet.
    other = model(codes, (cond_codes + 1) % 5)
    assert not torch.allclose(model(codes, cond_codes)[..., 0, 0], other[..., 0, 0])
    with pytest.raises(ValueError):
        model(codes, None)


def test_class_label_conditioning():
    torch.manual_seed(0)
    model = GatedPixelCNN(PixelCNNConfig(num_codes=11, channels=8, layers=2, kernel=3, head_channels=16,
                                         num_classes=3))
    codes = torch.randint(0, 11, (2, 5, 5))
    a = model(codes, label=torch.tensor([0, 0]))
    b = model(codes, label=torch.tensor([1, 2]))
    assert a.shape == (2, 11, 5, 5)
    assert not torch.allclose(a, b)
