"""What every training run shares: run directory, checkpoints, resume, schedule and the loop.

A checkpoint holds everything needed to continue bit-for-bit: model (with EMA buffers),
optimizer, scheduler, step, torch and numpy RNG states, and the config. It is written every
``ckpt_every`` steps, at the end, and on Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from training.config import explicit_args, merge_for_resume

CHECKPOINT = "checkpoint.pt"


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to 10% at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def checkpoint_path(path: str | Path) -> Path:
    """Accept a run directory or a checkpoint file."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_model(path: str | Path, kind: str) -> torch.nn.Module:
    """Rebuild a trained model from its checkpoint's config alone, in eval mode."""
    from models import VQVAE2, GatedPixelCNN, PixelCNNConfig, VQVAEConfig

    builders = {"vqvae": (VQVAE2, VQVAEConfig), "prior": (GatedPixelCNN, PixelCNNConfig)}
    ckpt = load_checkpoint(path)
    if ckpt["kind"] != kind:
        raise ValueError(f"{path} is a {ckpt['kind']} checkpoint, not a {kind}")
    model_cls, config_cls = builders[kind]
    model = model_cls(config_cls(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def resolve_config(cls: type, args) -> tuple[Any, dict[str, Any] | None]:
    """The run's config and, with --resume, the checkpoint to continue from."""
    given = explicit_args(args)
    ckpt_file = Path(args.run) / CHECKPOINT
    if args.resume:
        ckpt = load_checkpoint(ckpt_file)
        return merge_for_resume(cls, ckpt["config"], given), ckpt
    if ckpt_file.exists():
        raise FileExistsError(f"{ckpt_file} exists: pass --resume to continue it, or choose a new --run")
    return cls(**given), None


class Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


@dataclass
class Run:
    """Mutable state of one training run."""

    kind: str  # "vqvae" or "prior"
    directory: Path
    config: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rng: np.random.Generator
    step: int = 0
    extra: dict[str, Any] | None = None  # kind-specific facts stored with the checkpoint
    main: bool = True  # False on DDP ranks other than 0: they neither write nor evaluate

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": asdict(self.config), "step": self.step,
                "model_config": asdict(self.model.config), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "numpy_rng": self.rng.bit_generator.state,
                "extra": self.extra or {}}

    def restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt["kind"] != self.kind:
            raise ValueError(f"checkpoint is a {ckpt['kind']} run, not {self.kind}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.rng.bit_generator.state = ckpt["numpy_rng"]
        self.step = ckpt["step"]
        # After a hard kill the log may run past the checkpoint; those steps will be redone.
        kept = [r for r in read_metrics(self.directory) if r["step"] <= self.step]
        if self.main:
            (self.directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    def save(self) -> Path:
        path = self.directory / CHECKPOINT
        if not self.main:
            return path
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)  # atomic: a crash mid-write never leaves a torn checkpoint
        return path

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.directory / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **record}) + "\n")


def train(run: Run, step_fn: Callable[[], dict[str, float]],
          eval_fn: Callable[[], dict[str, float]], postfix: Callable[[dict], dict]) -> None:
    """Run ``step_fn`` until ``config.steps``: logging, evaluating and checkpointing on cadence."""
    cfg = run.config
    run.directory.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    bar = tqdm(total=cfg.steps, initial=run.step, desc=f"train {run.kind}", dynamic_ncols=True,
               disable=not run.main)
    started, last_step = time.perf_counter(), run.step
    try:
        while run.step < cfg.steps:
            metrics = step_fn()
            run.step += 1
            bar.update(1)
            if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                now = time.perf_counter()
                metrics["sec_per_step"] = (now - started) / max(1, run.step - last_step)
                started, last_step = now, run.step
                metrics["lr"] = run.scheduler.get_last_lr()[0]
                run.log({"split": "train", **metrics})
                bar.set_postfix(postfix(metrics))
            if run.main and (run.step % cfg.eval_every == 0 or run.step == cfg.steps):
                run.log({"split": "heldout", **eval_fn()})
            if run.step % cfg.ckpt_every == 0:
                run.save()
        run.save()
    except (KeyboardInterrupt, Interrupted):
        path = run.save()
        bar.write(f"interrupted at step {run.step}; checkpoint saved to {path}; continue with --resume")
        raise SystemExit(130)
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous)


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    path = directory / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
