"""Where a run executes: device choice, CPU threads, precision (bf16 autocast), and DDP under torchrun.

``torchrun --nproc_per_node N vqtok train-vqvae ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; then each
process joins a process group (NCCL on GPUs, gloo on CPU), gradients are all-reduced by
DistributedDataParallel and the EMA codebook statistics by the quantizer itself
(``models.quantizer``), so every rank holds the same weights and codebooks after every step.
Rank 0 alone writes checkpoints, logs and evaluations.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise SystemExit(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


PRECISIONS = ("bf16", "fp32")


@dataclass
class Placement:
    device: torch.device
    rank: int = 0
    world: int = 1
    precision: str = "bf16"  # "bf16": autocast on CUDA and on CPU (AMX/AVX-512 bf16 units); "fp32": none

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def autocast(self):
        """bf16 autocast unless the run asked for fp32; the quantizers keep their math in fp32 either way.

        On CPU this is what makes training fast: with channels_last (``prepare``) oneDNN runs the
        convolutions on the AMX-BF16 tiles, 2.3x the fp32 steps/s on one core of this machine."""
        if self.precision == "bf16" and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the run's device, channels_last for bf16 on CPU (oneDNN's fast layout)."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """A batch [N, C, H, W] in the layout the prepared model wants."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def channels_last(self) -> bool:
        return self.precision == "bf16" and self.device.type == "cpu"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to call in training steps: DDP-wrapped when distributed. Buffers are synced
        from rank 0 once, at wrapping, not before every forward: from then on the EMA codebooks stay
        equal through all-reduced statistics."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def place(device: str, threads: int = 0, precision: str = "bf16") -> Placement:
    """Set threads, join the process group when launched by torchrun, pick the device and precision."""
    if precision not in PRECISIONS:
        raise SystemExit(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if threads > 0:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Placement(resolve_device(device), precision=precision)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Placement(dev, dist.get_rank(), dist.get_world_size(), precision)


def leave(placement: Placement) -> None:
    if placement.distributed and dist.is_initialized():
        dist.destroy_process_group()
