"""Evaluation pieces: codecs at a byte budget, and a bundle's weights rebuilt in PyTorch."""
import pytest
import torch

from tests.conftest import TINY_SIZE, random_images, tiny_models
from training.codecs import QUALITY_RANGE, at_budget, encode


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_codec_takes_the_best_quality_that_fits_the_budget(fmt):
    image = random_images(1, size=96, seed=4)[0]
    budget = len(encode(image, fmt, 50))
    coded = at_budget(image, fmt, budget)
    assert not coded.over_budget and coded.bytes <= budget and coded.quality >= 50
    assert coded.quality == QUALITY_RANGE[fmt][1] or len(encode(image, fmt, coded.quality + 1)) > budget
    assert coded.psnr > at_budget(image, fmt, len(encode(image, fmt, 5))).psnr
    # A budget no quality meets: the smallest file, flagged, never a silently empty baseline.
    tiny = at_budget(image, fmt, 10)
    assert tiny.over_budget and tiny.bytes > 10


def test_bundle_weights_rebuild_the_models_exactly(tiny_bundle):
    from training.from_bundle import from_bundle

    vqvae, prior_top, prior_bottom = tiny_models()
    rebuilt, priors, _ = from_bundle(tiny_bundle)
    x = torch.from_numpy(random_images(3, size=TINY_SIZE, seed=9)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        want, got = vqvae(x), rebuilt(x)
        assert torch.equal(want["recon"], got["recon"])
        for name in ("top", "bottom"):
            assert torch.equal(want["levels"][name]["codes"], got["levels"][name]["codes"])
        codes = {n: lv["codes"] for n, lv in want["levels"].items()}
        assert torch.equal(prior_top(codes["top"]), priors["top"](codes["top"]))
        assert torch.equal(prior_bottom(codes["bottom"], codes["top"]), priors["bottom"](codes["bottom"], codes["top"]))
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in vqvae.parameters())


def test_warm_start_loads_a_bundle_and_restarts_the_ema_statistics(tiny_bundle):
    from models import VQVAE2, GatedPixelCNN
    from training.from_bundle import EMA_START_COUNT, warm_start

    vqvae, prior_top, _ = tiny_models()
    fresh = VQVAE2(vqvae.config)
    warm_start(fresh, tiny_bundle)
    for name, param in vqvae.named_parameters():
        assert torch.equal(param, dict(fresh.named_parameters())[name]), name
    q = fresh.quant_bottom
    assert torch.equal(q.embedding, vqvae.quant_bottom.embedding) and bool(q.initialized)
    assert torch.all(q.cluster_size == EMA_START_COUNT) and torch.allclose(q.embed_sum, q.embedding * EMA_START_COUNT)
    prior = GatedPixelCNN(prior_top.config)
    warm_start(prior, tiny_bundle, "top")
    assert all(torch.equal(a, b) for a, b in zip(prior.state_dict().values(), prior_top.state_dict().values()))
    from models import PixelCNNConfig

    with pytest.raises(SystemExit, match="differs"):
        warm_start(GatedPixelCNN(PixelCNNConfig(num_codes=32, channels=4)), tiny_bundle, "top")
