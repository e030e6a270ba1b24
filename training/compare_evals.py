"""Before/after table of two ``vqtok evaluate`` reports on the same held-out files, against issue 16's targets.

    python -m training.compare_evals OLD/eval.json NEW/eval.json [--old-bundle DIR] [--new-bundle DIR] [--out X.json]

Prints a Markdown table (measure, before, after, target, met) and writes the same as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# (label, how to read it from a report, target, "ge"/"le"/"lt"): the targets of issue 16.
MEASURES: list[tuple[str, Any, float | None, str]] = [
    ("thumbnail PSNR (dB)", lambda r: r["reconstruction"]["psnr"], 27.5, "ge"),
    ("native size, tokens - JPEG at the same bytes (dB)", lambda r: r["native"]["jpeg"]["gap_db"], 1.0, "ge"),
    ("native size, tokens - WebP at the same bytes (dB)", lambda r: r["native"]["webp"]["gap_db"], -1.0, "ge"),
    ("native size PSNR (dB)", lambda r: r["native"]["psnr"], None, ""),
    ("native size, bits per pixel under the priors", lambda r: r["native"]["bits_per_pixel"], None, ""),
    ("prior bits per code, top (thumbnails)", lambda r: r["levels"]["top"]["prior_bits_per_code"], 5.0, "le"),
    ("prior bits per code, bottom (thumbnails)", lambda r: r["levels"]["bottom"]["prior_bits_per_code"], 6.0, "le"),
    ("prior bits per code, top (native size)", lambda r: r["native"]["prior_bits_per_code"]["top"], 7.0, "lt"),
    ("prior bits per code, bottom (native size)", lambda r: r["native"]["prior_bits_per_code"]["bottom"], 7.0, "lt"),
    ("codes used on thumbnails, top (%)", lambda r: r["levels"]["top"]["codes_used_pct"], 95.0, "ge"),
    ("codes used on thumbnails, bottom (%)", lambda r: r["levels"]["bottom"]["codes_used_pct"], 95.0, "ge"),
    ("held-out images", lambda r: r["heldout_images"], None, ""),
]


def read(report: dict, fn) -> float | None:
    try:
        return float(fn(report))
    except (KeyError, TypeError):
        return None  # an older report without this figure


def met(value: float | None, target: float | None, how: str) -> bool | None:
    if value is None or target is None:
        return None
    return {"ge": value >= target, "le": value <= target, "lt": value < target}[how]


def bundle_mb(path: str | None) -> float | None:
    if not path:
        return None
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--old-bundle")
    p.add_argument("--new-bundle")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    old, new = json.loads(args.old.read_text()), json.loads(args.new.read_text())
    rows = []
    for label, fn, target, how in MEASURES:
        before, after = read(old, fn), read(new, fn)
        rows.append({"measure": label, "before": before, "after": after, "target": target, "rule": how,
                     "met": met(after, target, how)})
    rows.append({"measure": "bundle size (MB)", "before": bundle_mb(args.old_bundle), "after": bundle_mb(args.new_bundle),
                 "target": 40.0, "rule": "lt", "met": met(bundle_mb(args.new_bundle), 40.0, "lt")})
    fmt = (lambda v: "-" if v is None else f"{v:.2f}")
    sign = {"ge": ">=", "le": "<=", "lt": "<", "": ""}
    print("| measure | before | after | target | met |\n|---|---|---|---|---|")
    for r in rows:
        target = "" if r["target"] is None else f"{sign[r['rule']]} {r['target']:g}"
        print(f"| {r['measure']} | {fmt(r['before'])} | {fmt(r['after'])} | {target} | "
              f"{'' if r['met'] is None else ('yes' if r['met'] else 'no')} |")
    if args.out:
        args.out.write_text(json.dumps({"old": str(args.old), "new": str(args.new), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
