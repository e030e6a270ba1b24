"""The continuous-VAE prior experiment: flow log-dets and inverses, the likelihood, the ELBO-surgery
estimator against closed-form / quadrature answers, and a tiny end-to-end run."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models.flow import AffineCoupling, FlowConfig, RealNVPPrior, StandardNormalPrior, coupling_mask
from models.vae import discretized_logistic_log_prob
from training import vae_prior
from training.vae_prior import elbo_surgery


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def randomised(module: torch.nn.Module, seed: int = 0, std: float = 0.5) -> torch.nn.Module:
    """Non-zero weights everywhere: a zero-initialised coupling is the identity, which tests nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module.double()


@pytest.mark.parametrize("dim,index", [(4, 0), (4, 1), (5, 2), (5, 3)])
def test_coupling_log_det_matches_brute_force_jacobian(dim, index):
    layer = randomised(AffineCoupling(dim, 8, coupling_mask(dim, index), max_log_scale=2.0), seed=index)
    for z in torch.randn(3, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64):
        jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], z)
        _, log_det = layer(z[None])
        assert log_det.item() != pytest.approx(0.0, abs=1e-3)  # the layer really scales
        assert log_det.item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-10)


def test_flow_log_dets_match_jacobian_both_ways():
    flow = randomised(RealNVPPrior(FlowConfig(dim=4, layers=4, hidden=8)), std=0.3)
    z = torch.randn(4, dtype=torch.float64)
    u, fwd = flow(z[None])
    assert fwd.item() == pytest.approx(torch.linalg.slogdet(
        torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], z))[1].item(), abs=1e-9)
    _, inv = flow.inverse(u)
    assert inv.item() == pytest.approx(torch.linalg.slogdet(
        torch.autograd.functional.jacobian(lambda v: flow.inverse(v[None])[0][0], u[0]))[1].item(), abs=1e-9)
    assert inv.item() == pytest.approx(-fwd.item(), abs=1e-10)


def test_flow_is_invertible():
    flow = randomised(RealNVPPrior(FlowConfig(dim=6, layers=6, hidden=16)), std=0.3)
    z = torch.randn(64, 6, dtype=torch.float64) * 2
    u, _ = flow(z)
    assert not torch.allclose(u, z, atol=1e-2)
    assert torch.allclose(flow.inverse(u)[0], z, atol=1e-10)
    assert torch.allclose(flow(flow.inverse(z)[0])[0], z, atol=1e-10)


def test_flow_density_integrates_to_one_in_2d():
    flow = randomised(RealNVPPrior(FlowConfig(dim=2, layers=4, hidden=8)), std=0.2)
    grid = torch.linspace(-12, 12, 601, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        mass = flow.log_prob(zz).exp().sum().item() * (grid[1] - grid[0]).item() ** 2
    assert mass == pytest.approx(1.0, abs=5e-3)


def test_untrained_flow_prior_equals_standard_normal():
    # Zero-initialised couplings: both arms of the experiment start from the same prior.
    z = torch.randn(16, 8)
    assert torch.allclose(RealNVPPrior(FlowConfig(dim=8)).log_prob(z), StandardNormalPrior(8).log_prob(z))


@pytest.mark.parametrize("mean,log_scale", [(0.3, -1.0), (-0.99, 0.5), (0.0, -6.0), (0.6, -9.0)])
def test_discretized_logistic_is_a_pmf_over_256_levels(mean, log_scale):
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    p = discretized_logistic_log_prob(x, torch.tensor(mean, dtype=torch.float64),
                                      torch.tensor(log_scale, dtype=torch.float64)).exp()
    assert torch.isfinite(p).all()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-9)


def posterior_samples(mu: torch.Tensor, s: float, samples: int, seed: int = 0):
    """z [N, S, d] from q(z|x_n) = N(mu_n, s^2 I), with log p(z) under p = N(0, I)."""
    gen = torch.Generator().manual_seed(seed)
    z = mu[:, None] + s * torch.randn(mu.shape[0], samples, mu.shape[1], generator=gen, dtype=torch.float64)
    log_p = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
    logvar = torch.full_like(mu, 2 * math.log(s))
    return mu, logvar, z, log_p


def test_surgery_matches_quadrature_for_overlapping_1d_mixture():
    # q(z|x_n) = N(mu_n, 1), p = N(0, 1): mean KL has a closed form, I and KL(q_agg||p) by quadrature.
    mu_values, s = torch.tensor([-1.5, 0.0, 2.0], dtype=torch.float64), 1.0
    terms = elbo_surgery(*posterior_samples(mu_values[:, None], s, samples=40_000))
    grid = torch.linspace(-14, 14, 200_001, dtype=torch.float64)
    dz = (grid[1] - grid[0]).item()
    log_q = -0.5 * ((grid[None] - mu_values[:, None]) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
    log_q_agg = torch.logsumexp(log_q, 0) - math.log(len(mu_values))
    log_p = -0.5 * grid ** 2 - 0.5 * math.log(2 * math.pi)
    mi = (log_q.exp() * (log_q - log_q_agg)).sum(1).mean().item() * dz
    kl_agg = (log_q_agg.exp() * (log_q_agg - log_p)).sum().item() * dz
    closed = (0.5 * (s ** 2 + mu_values ** 2 - 1 - 2 * math.log(s))).mean().item()
    assert 0.2 < mi < math.log(3) - 0.2  # a case where neither bound is trivially hit
    assert mi + kl_agg == pytest.approx(closed, abs=1e-6)  # the theorem itself, on the reference
    assert terms["mean_kl_nats"] == pytest.approx(closed, abs=0.03)
    assert terms["mutual_information_nats"] == pytest.approx(mi, abs=0.02)
    assert terms["kl_qagg_prior_nats"] == pytest.approx(kl_agg, abs=0.03)
    assert abs(terms["identity_residual_nats"]) < 1e-10


def test_surgery_well_separated_posteriors_give_log_n():
    # Means 50 apart with unit-scale noise: no overlap, so I = log N and KL(q_agg||p) = mean KL - log N.
    mu = torch.tensor([[-50.0, 0.0], [0.0, 0.0], [50.0, 0.0], [0.0, 50.0]], dtype=torch.float64)
    s = 0.5
    terms = elbo_surgery(*posterior_samples(mu, s, samples=2_000))
    closed = (0.5 * (2 * s ** 2 + mu.pow(2).sum(1) - 2 - 2 * 2 * math.log(s))).mean().item()
    assert terms["mutual_information_nats"] == pytest.approx(math.log(4), abs=1e-9)
    assert terms["mean_kl_nats"] == pytest.approx(closed, rel=0.01)
    assert terms["kl_qagg_prior_nats"] == pytest.approx(terms["mean_kl_nats"] - math.log(4), abs=1e-9)


def test_surgery_identical_posteriors_carry_no_information():
    mu = torch.full((5, 3), 0.7, dtype=torch.float64)
    terms = elbo_surgery(*posterior_samples(mu, 0.3, samples=200))
    assert terms["mutual_information_nats"] == pytest.approx(0.0, abs=1e-12)
    assert terms["kl_qagg_prior_nats"] == pytest.approx(terms["mean_kl_nats"], abs=1e-12)


def test_both_arms_start_from_the_same_vae():
    args = vae_prior.parse_args(["--latent-dim", "4", "--channels", "8", "--image-size", "16"])
    a, b = vae_prior.build_model("standard", args), vae_prior.build_model("realnvp", args)
    vae_a = {k: v for k, v in a.state_dict().items() if not k.startswith("prior.")}
    vae_b = {k: v for k, v in b.state_dict().items() if not k.startswith("prior.")}
    assert vae_a.keys() == vae_b.keys()
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)


def test_experiment_end_to_end(tmp_path):
    result = vae_prior.main(["--out", str(tmp_path), "--steps", "3", "--batch-size", "8", "--image-size", "16",
                             "--latent-dim", "4", "--channels", "8", "--flow-layers", "2", "--flow-hidden", "16",
                             "--heldout-max", "40", "--eval-samples", "3", "--log-every", "1"])
    saved = json.loads((tmp_path / "vae_prior.json").read_text())
    assert (tmp_path / "vae_prior.png").stat().st_size > 0
    assert saved["heldout_images"] == 40 and saved["samples_per_image"] == 3
    assert set(saved["runs"]) == {"standard", "realnvp"} == set(result["runs"])
    for run in saved["runs"].values():
        for key in ("neg_elbo_bpd", "recon_bpd", "kl_bpd", "mean_kl_nats", "mutual_information_nats",
                    "kl_qagg_prior_nats", "identity_residual_nats", "log_N_nats"):
            assert np.isfinite(run[key]), key
        assert abs(run["identity_residual_nats"]) < 1e-9
        # I <= log N holds sample by sample; I >= 0 only in expectation (a sample can favour another component).
        assert run["mutual_information_nats"] <= run["log_N_nats"] + 1e-9
        assert run["neg_elbo_bpd"] == pytest.approx(run["recon_bpd"] + run["kl_bpd"], rel=1e-9)
    assert saved["runs"]["realnvp"]["prior_parameters"] > 0 == saved["runs"]["standard"]["prior_parameters"]
    assert "mean_kl_closed_form_nats" in saved["runs"]["standard"]
