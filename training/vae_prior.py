"""Experiment: the lecture's learnable prior for a continuous VAE (ELBO surgery, N(0, I) vs RealNVP).

The same Gaussian VAE (``models.vae``) is trained twice, with the same seed, steps, batches
and reparameterisation noise: once with p(z) = N(0, I), once with a RealNVP flow prior
(``models.flow``) trained jointly through the ELBO. The flow starts as the identity, so both
arms start from the same model and differ only in whether p(z) can move.

On held-out images only (the data source holds them out whole), for each arm:

* ELBO in bits/dim and its reconstruction term -E_q log p(x|z) (discretized logistic, so an
  honest bound on the uint8 data);
* mean KL(q(z|x_n) || p(z)), a Monte Carlo estimate with S posterior samples per image (the
  flow prior has no closed form; for N(0, I) the closed form is reported too, as a check);
* the surgery terms. q_agg is the mixture of the N held-out posteriors,
  q_agg(z) = (1/N) sum_m q(z|x_m). For the same samples z ~ q(z|x_n):

      log q_agg(z)   = logsumexp_m log q(z|x_m) - log N          (exact: all N components)
      KL(q_agg || p) = E_n E_{q(z|x_n)} [log q_agg(z) - log p(z)]
      I[x, z]        = E_n E_{q(z|x_n)} [log q(z|x_n) - log q_agg(z)]

  so mean KL = KL(q_agg || p) + I holds sample by sample; the reported residual is float
  round-off and checks the bookkeeping, not the theorem.

Estimator and bias. For the N-image mixture itself the only error is Monte Carlo noise (the
mixture density is evaluated exactly). As estimates of the *population* quantities (q_agg
over the whole image distribution) they are biased: the mixture always contains the sample's
own component, so log q_agg(z) >= log q(z|x_n) - log N for every sample, hence I <= log N
(I >= 0 holds only in expectation: a single sample can favour another component). I is biased
down, and saturates at log N once the posteriors barely overlap, and KL(q_agg || p) is biased
up by the same amount (the N-point mixture is spikier than the population q_agg). Their sum,
the mean KL, is unbiased. Both arms are scored with the same N and S, so the comparison is fair.

Writes ``OUT/vae_prior.json`` and ``OUT/vae_prior.png`` (q_agg samples against prior samples,
projected on the top two principal components of the q_agg samples, one panel per arm).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from models.flow import FlowConfig, RealNVPPrior, StandardNormalPrior, standard_normal_log_prob
from models.vae import GaussianVAE, VAEConfig, bits_per_dim, diag_gaussian_log_prob, to_unit_range
from training.data import PhotoSource, make_source
from training.loop import warmup_cosine

PRIORS = ("standard", "realnvp")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vqtok experiment vae-prior", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="photos", help="'photos' (built-in, 2 photos held out) or an image folder")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of a folder's files")
    p.add_argument("--out", default="runs/vae_prior", help="directory for vae_prior.json and vae_prior.png")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--latent-dim", type=int, default=16)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--flow-layers", type=int, default=8)
    p.add_argument("--flow-hidden", type=int, default=128)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-max", type=int, default=0,
                   help="use at most this many held-out crops, evenly spaced (0 = all)")
    p.add_argument("--eval-samples", type=int, default=8, help="posterior samples S per held-out image")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=200)
    return p.parse_args(argv)


def make_prior(name: str, args: argparse.Namespace) -> torch.nn.Module:
    if name == "standard":
        return StandardNormalPrior(args.latent_dim)
    if name == "realnvp":
        return RealNVPPrior(FlowConfig(dim=args.latent_dim, layers=args.flow_layers, hidden=args.flow_hidden))
    raise ValueError(f"unknown prior {name!r}")


def build_model(name: str, args: argparse.Namespace) -> GaussianVAE:
    # The prior's weights come from their own seed and the VAE's from args.seed, so the
    # encoder and decoder start identical in both arms.
    torch.manual_seed(args.seed + 1)
    prior = make_prior(name, args)
    torch.manual_seed(args.seed)
    return GaussianVAE(VAEConfig(image_size=args.image_size, latent_dim=args.latent_dim,
                                 channels=args.channels), prior)


def train(model: GaussianVAE, source, args: argparse.Namespace) -> dict[str, float]:
    """Maximise the one-sample ELBO (per dimension, so the learning rate does not depend on image size)."""
    rng = np.random.default_rng(args.seed)  # same crops in both arms
    noise = torch.Generator().manual_seed(args.seed + 2)  # same reparameterisation noise in both arms
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(min(200, args.steps // 10 + 1), args.steps))
    model.train()
    start, window = time.perf_counter(), []
    for step in range(args.steps):
        x = to_unit_range(torch.from_numpy(source.sample_batch(rng, args.batch_size)))
        out = model(x, generator=noise)
        loss = (out["recon"] + out["kl"]).mean() / model.dims
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # A generous clip: only a rare early spike (a near-zero posterior variance) ever reaches it.
        torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
        opt.step()
        sched.step()
        window.append((out["recon"].mean().item(), out["kl"].mean().item()))
        window = window[-args.log_every:]
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recon, kl = np.mean(window, axis=0)
            print(f"  step {step + 1:5d}  -elbo {bits_per_dim(recon + kl, model.dims):.4f} bpd  "
                  f"recon {bits_per_dim(recon, model.dims):.4f} bpd  kl {kl:.2f} nats", flush=True)
    recon, kl = np.mean(window, axis=0)
    return {"train_seconds": time.perf_counter() - start,
            "train_neg_elbo_bpd_last_window": bits_per_dim(recon + kl, model.dims)}


def elbo_surgery(mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor, log_p: torch.Tensor,
                 chunk: int = 512) -> dict[str, float]:
    """Mean KL, I[x, z] and KL(q_agg || p) in nats from posterior samples (see the module docstring).

    mu, logvar: [N, d], the N Gaussian posteriors whose mixture is q_agg.
    z: [N, S, d], S samples from each q(z|x_n).  log_p: [N, S], log p(z) at those samples.
    Computed in float64 so the identity residual is round-off of order 1e-12, not 1e-4.
    """
    mu, logvar, z, log_p = (t.double() for t in (mu, logvar, z, log_p))
    n, s, d = z.shape
    log_q_own = diag_gaussian_log_prob(z, mu[:, None], logvar[:, None])  # [N, S]
    flat = z.reshape(-1, d)
    log_q_agg = torch.cat([
        torch.logsumexp(diag_gaussian_log_prob(block[:, None, :], mu[None], logvar[None]), dim=1)
        for block in flat.split(chunk)]).view(n, s) - math.log(n)
    per_image = {
        "mean_kl": (log_q_own - log_p).mean(1),
        "kl_qagg_prior": (log_q_agg - log_p).mean(1),
        "mutual_information": (log_q_own - log_q_agg).mean(1),
    }
    terms = {f"{k}_nats": v.mean().item() for k, v in per_image.items()}
    # Standard error over images (the samples of one image are averaged first).
    terms.update({f"{k}_stderr_nats": (v.std() / math.sqrt(n)).item() for k, v in per_image.items()})
    terms["identity_residual_nats"] = terms["mean_kl_nats"] - terms["kl_qagg_prior_nats"] \
        - terms["mutual_information_nats"]
    terms["log_N_nats"] = math.log(n)
    return terms


@torch.no_grad()
def evaluate(model: GaussianVAE, images: np.ndarray, samples: int, seed: int,
             batch: int = 128) -> tuple[dict[str, float], torch.Tensor]:
    """Held-out ELBO terms and surgery terms; returns them and the posterior samples z [N, S, d]."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    mus, logvars, zs, log_ps, recons = [], [], [], [], []
    for i in range(0, len(images), batch):
        x = to_unit_range(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])))
        mu, logvar = model.encode(x)
        z = mu[:, None] + torch.exp(0.5 * logvar)[:, None] * torch.randn(len(x), samples, mu.shape[1], generator=gen)
        x_rep = x.repeat_interleave(samples, dim=0)
        recons.append(model.reconstruction_nll(x_rep, z.reshape(-1, z.shape[-1])).view(len(x), samples))
        log_ps.append(model.prior.log_prob(z.reshape(-1, z.shape[-1])).view(len(x), samples))
        mus.append(mu)
        logvars.append(logvar)
        zs.append(z)
    mu, logvar, z, log_p, recon = (torch.cat(t) for t in (mus, logvars, zs, log_ps, recons))
    terms = elbo_surgery(mu, logvar, z, log_p)
    recon_nats = recon.double().mean().item()
    dims = model.dims
    result = {
        "neg_elbo_bpd": bits_per_dim(recon_nats + terms["mean_kl_nats"], dims),
        "recon_bpd": bits_per_dim(recon_nats, dims),
        "kl_bpd": bits_per_dim(terms["mean_kl_nats"], dims),
        "recon_nats": recon_nats,
        **terms,
    }
    if isinstance(model.prior, StandardNormalPrior):
        # KL(N(mu, s^2) || N(0, 1)) in closed form: an independent check of the Monte Carlo mean KL.
        closed = 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(1)
        result["mean_kl_closed_form_nats"] = closed.double().mean().item()
    return result, z


def pca_2d(reference: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Project arrays onto the top-2 principal axes of ``reference`` (centred on its mean)."""
    centre = reference.mean(0)
    _, _, vt = np.linalg.svd(reference - centre, full_matrices=False)
    return [(a - centre) @ vt[:2].T for a in (reference, *others)]


def save_plot(panels: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8))
    for ax, p in zip(np.atleast_1d(axes), panels):
        q2, prior2 = pca_2d(p["q_agg"], p["prior"])
        ax.scatter(prior2[:, 0], prior2[:, 1], s=4, alpha=0.35, label=f"p(z): {p['prior_label']}", color="tab:orange")
        ax.scatter(q2[:, 0], q2[:, 1], s=4, alpha=0.35, label="q_agg (held-out posteriors)", color="tab:blue")
        ax.set_title(f"{p['title']}\nKL(q_agg||p) = {p['kl']:.1f} nats, I = {p['mi']:.2f} nats")
        ax.set_xlabel("PC 1 of q_agg samples")
        ax.set_ylabel("PC 2")
        ax.legend(loc="upper right", markerscale=3, fontsize=8)
        # Frame on q_agg (with a margin) so a broad prior does not shrink it to a dot.
        lo, hi = np.percentile(np.concatenate([q2, prior2]), [0.5, 99.5], axis=0)
        pad = 0.05 * (hi - lo)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def select_heldout(images: np.ndarray, limit: int) -> np.ndarray:
    if limit and len(images) > limit:
        return images[np.linspace(0, len(images) - 1, limit).round().astype(int)]
    return images


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = make_source(args.data, args.image_size, args.val_fraction)
    # For `photos`, the two held-out photos as half-overlapping crops at every scale: their two
    # thumbnails alone would give N = 2, far too few components for the mixture estimate of q_agg.
    views = PhotoSource.build(args.image_size).heldout() if args.data == "photos" else source.heldout()
    heldout = select_heldout(views, args.heldout_max)
    print(f"held-out: {len(heldout)} crops of {args.image_size}x{args.image_size}; "
          f"log N = {math.log(len(heldout)):.3f} nats", flush=True)

    runs, panels = {}, []
    for name in PRIORS:
        print(f"[{name}] training {args.steps} steps", flush=True)
        model = build_model(name, args)
        info = train(model, source, args)
        metrics, z = evaluate(model, heldout, args.eval_samples, seed=args.seed + 3)
        runs[name] = {**metrics, **info,
                      "prior_parameters": sum(p.numel() for p in model.prior.parameters())}
        prior_samples = model.prior.sample(len(heldout), generator=torch.Generator().manual_seed(args.seed + 4))
        panels.append({"title": f"VAE trained with p(z) = {'N(0, I)' if name == 'standard' else 'RealNVP'}",
                       "prior_label": "N(0, I)" if name == "standard" else "RealNVP samples",
                       "q_agg": z[:, 0].numpy(), "prior": prior_samples.numpy(),
                       "kl": metrics["kl_qagg_prior_nats"], "mi": metrics["mutual_information_nats"]})
        # How far the flow moved from N(0, I) on q_agg: log p_flow - log N(0, I) at the posterior samples.
        if name == "realnvp":
            flat = z.reshape(-1, z.shape[-1])
            runs[name]["mean_log_p_minus_log_std_normal_nats"] = \
                (model.prior.log_prob(flat) - standard_normal_log_prob(flat)).double().mean().item()
        print(f"[{name}] held-out: -elbo {metrics['neg_elbo_bpd']:.4f} bpd  recon {metrics['recon_bpd']:.4f} bpd  "
              f"mean KL {metrics['mean_kl_nats']:.2f} = KL(q_agg||p) {metrics['kl_qagg_prior_nats']:.2f} "
              f"+ I {metrics['mutual_information_nats']:.3f} (residual {metrics['identity_residual_nats']:.1e})",
              flush=True)

    result = {
        "config": vars(args),
        "vae": asdict(VAEConfig(image_size=args.image_size, latent_dim=args.latent_dim, channels=args.channels)),
        "likelihood": "discretized logistic per subpixel over 256 levels (bits/dim = nats / (3 H W ln 2))",
        "heldout_images": len(heldout),
        "samples_per_image": args.eval_samples,
        "units": "*_bpd: bits per subpixel; *_nats: nats per image",
        "runs": runs,
    }
    (out / "vae_prior.json").write_text(json.dumps(result, indent=2))
    save_plot(panels, out / "vae_prior.png")
    print(f"wrote {out / 'vae_prior.json'} and {out / 'vae_prior.png'}")
    return result


if __name__ == "__main__":
    main()
