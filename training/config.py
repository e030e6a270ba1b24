"""Typed training configs and their command-line flags.

Every field becomes a ``--flag`` whose default is None, so that we can tell a value the user
typed from one they left alone. That is what lets ``--resume`` refuse a conflicting value
instead of silently overwriting it (see ``merge_for_resume``).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

C = TypeVar("C")


@dataclass
class VQVAETrainConfig:
    data: str = "photos"  # comma-separated sources: "photos" (built in) and/or image folders
    data_terms: str = ""  # the folders' terms of use, recorded in the bundle's manifest
    cache: str = ""  # directory of the packed training images ("" = RUN/cache)
    cache_side: int = 256  # the pack keeps each image's shorter side at most this (and at least image_size)
    device: str = "auto"  # "auto" (CUDA when torch sees it), "cpu" or "cuda"
    threads: int = 0  # torch CPU threads (0 = torch's default)
    precision: str = "bf16"  # "bf16" autocast (CPU and CUDA) or "fp32"; the quantizers always run in fp32
    init: str = ""  # a bundle directory whose weights the run starts from (fine-tuning); "" = random
    image_size: int = 64
    batch_size: int = 64
    steps: int = 5000
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    val_fraction: float = 0.1  # image folders only: share of files held out, chosen by file hash
    levels: int = 2
    channels: int = 128
    res_blocks: int = 2
    res_channels: int = 32
    codes: int = 512
    embed_dim: int = 64
    quantizer: str = "ema"  # models.quantizer KINDS: "ema", "factorized" or "fsq"
    gradient: str = "ste"  # "ste" or "rotation" (the rotation trick)
    code_dim: int = 8  # "factorized": dimension of the l2-normalised codes
    fsq_levels: str = "8,8,8"  # "fsq": levels per dimension; their product must equal --codes
    log_every: int = 10
    eval_every: int = 500
    ckpt_every: int = 250

    def model_config(self):
        from models import QuantizerConfig, VQVAEConfig

        quant = QuantizerConfig(num_codes=self.codes, dim=self.embed_dim, kind=self.quantizer,
                                gradient=self.gradient, code_dim=self.code_dim,
                                fsq_levels=tuple(int(n) for n in self.fsq_levels.split(",")))
        return VQVAEConfig(levels=self.levels, channels=self.channels, res_blocks=self.res_blocks,
                           res_channels=self.res_channels, top=quant, bottom=QuantizerConfig(**asdict(quant)))


@dataclass
class PriorTrainConfig:
    vqvae: str = ""  # VQ-VAE run directory or checkpoint (required)
    level: str = "top"  # "top" or "bottom" (the bottom prior is conditioned on the top codes)
    data: str = "photos"
    cache: str = ""  # packed training images ("" = the VQ-VAE run's cache when --vqvae is a run directory)
    cache_side: int = 256
    device: str = "auto"
    threads: int = 0
    precision: str = "bf16"
    init: str = ""  # a bundle directory whose prior of this level the run starts from
    image_size: int = 64
    batch_size: int = 64
    steps: int = 3000
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    val_fraction: float = 0.1
    channels: int = 64
    layers: int = 8
    kernel: int = 5
    head_channels: int = 256
    log_every: int = 10
    eval_every: int = 500
    ckpt_every: int = 250

    def model_config(self, num_codes: int, cond_codes: int):
        from models import PixelCNNConfig

        return PixelCNNConfig(num_codes=num_codes, channels=self.channels, layers=self.layers,
                              kernel=self.kernel, head_channels=self.head_channels,
                              cond_codes=cond_codes if self.level == "bottom" else 0)


# Fields that may change when resuming: they steer the run, not what is being trained.
RESUMABLE_CHANGES = {"steps", "log_every", "eval_every", "ckpt_every", "cache", "device", "threads", "precision"}


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        parser.add_argument(flag, dest=f"cfg_{f.name}", type=kind, default=None,
                            help=f"(default: {f.default!r})")


def explicit_args(args: argparse.Namespace) -> dict[str, Any]:
    """Config values the user typed on the command line."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    return cls(**explicit_args(args))


def merge_for_resume(cls: type[C], saved: dict[str, Any], given: dict[str, Any]) -> C:
    """The checkpoint's config, with only the resumable fields the user changed.

    Raises ValueError naming every field where the command line contradicts the checkpoint.
    """
    conflicts = {k: (saved.get(k), v) for k, v in given.items()
                 if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if conflicts:
        lines = ", ".join(f"--{k.replace('_', '-')}={new!r} (checkpoint has {old!r})"
                          for k, (old, new) in conflicts.items())
        raise ValueError(f"refusing to resume: {lines}; start a new run to change these")
    merged = dict(saved)
    merged.update({k: v for k, v in given.items() if k in RESUMABLE_CHANGES})
    return cls(**merged)
