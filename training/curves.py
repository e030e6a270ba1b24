"""The long run's held-out curves: VQ-VAE PSNR and prior bits per code against training step, over
every round of ``training/train_default.sh`` (steps counted from the start of the long run).

    python -m training.curves runs/default --out docs/training_curves
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from training import plots  # noqa: F401 - selects the headless matplotlib backend


def heldout(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("split") == "heldout"]


def collect(runs: Path) -> dict[str, list[dict]]:
    """Per stage, the held-out records with the step counted across rounds."""
    out: dict[str, list[dict]] = {"vqvae": [], "prior_top": [], "prior_bottom": []}
    offset = {k: 0 for k in out}
    rounds = [p for p in runs.glob("round*") if p.is_dir() and p.name[5:].isdigit()]
    for round_dir in sorted(rounds, key=lambda p: int(p.name[5:])):
        for stage, rows in out.items():
            records = heldout(round_dir / stage / "metrics.jsonl")
            for r in records:
                rows.append({"round": round_dir.name, "step": offset[stage] + r["step"],
                                   **{k: r[k] for k in ("psnr", "bits_per_code", "top_codes_used_pct",
                                                        "bottom_codes_used_pct") if k in r}})
            if records:
                offset[stage] += records[-1]["step"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--out", type=Path, required=True, help="path stem: writes STEM.json and STEM.png")
    args = p.parse_args(argv)
    curves = collect(args.runs)
    args.out.with_suffix(".json").write_text(json.dumps(curves, indent=1) + "\n")

    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    v = curves["vqvae"]
    a.plot([r["step"] for r in v], [r["psnr"] for r in v], "o-")
    a.set(xlabel="VQ-VAE steps in the long run (batch 32)", ylabel="held-out thumbnail PSNR (dB)",
          title="VQ-VAE-2 (held-out files of every source)")
    for stage, style in (("prior_top", "o-"), ("prior_bottom", "s-")):
        rows = curves[stage]
        b.plot([r["step"] for r in rows], [r["bits_per_code"] for r in rows], style, label=stage.replace("_", " "))
    b.set(xlabel="prior steps (batch 32)", ylabel="held-out bits per code (log2 K = 9)", title="PixelCNN priors")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
