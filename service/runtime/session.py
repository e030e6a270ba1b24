"""The one place ONNX Runtime sessions are created: providers, CUDA options, threads.

Every session of the service, of ``vqtok sample``, of the folder jobs and of the export parity
check comes from ``open_session``, so a setting (threads, TF32, the CUDA fallback rule) means the
same thing everywhere.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger("vqtok.runtime")

# ONNX Runtime's names for its execution providers.
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per core)
    alone_threads: int = 0  # CPU: threads of an extra encoder/decoder session for a batch that runs alone; 0: none
    inter_op_threads: int = 1
    spinning: bool = False
    sampler: str = "cached"
    warmup_batch: int = 1  # the largest encode/decode batch the service runs (its max batch)
    sample_warmup_batch: int = 1  # the largest sampling batch (the service's sample max batch)
    # Pad every batch up to a power of two (see service.runtime.buckets). None: only on CUDA, where a
    # batch size seen for the first time costs ~65 ms (kernel choice, allocation) against ~1.8 ms.
    buckets: bool | None = None
    # CUDA: sampling batches of at most this many samples run on the CPU (0: never).
    cpu_sample_max: int = 0
    # TF32 convolutions on Ampere+ GPUs are ~1.7x faster but change 0.5-1.7 % of the codes against
    # the CPU (measured on an H200): off by default, so a token means the same on every device.
    tf32: bool = False

    def on_cpu(self) -> RuntimeConfig:
        return replace(self, device="cpu")


class DeviceUnavailable(RuntimeError):
    """``device=cuda`` was asked for but the CUDA execution provider does not load."""


_preloaded = False


def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu >= 1.21 finds the CUDA/cuDNN pip wheels (the [gpu] extra) only once asked to."""
    global _preloaded
    if _preloaded:
        return
    _preloaded = True
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as e:  # noqa: BLE001 - the libraries may come from the system instead
            log.info("onnxruntime.preload_dlls() failed (%s); relying on the system's CUDA libraries", e)


def session_options(cfg: RuntimeConfig) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = cfg.intra_op_threads
    opts.inter_op_num_threads = cfg.inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning keeps idle threads hot between batches; on a shared CPU it steals cycles from others.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg.spinning else "0")
    opts.log_severity_level = 3
    return opts


def cuda_options(cfg: RuntimeConfig) -> dict[str, str]:
    return {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "1" if cfg.tf32 else "0"}


def wants_cuda(cfg: RuntimeConfig) -> bool:
    if cfg.device == "cpu":
        return False
    available = ort.get_available_providers()
    if cfg.device == "cuda" and CUDA not in available:
        raise DeviceUnavailable(f"device=cuda but onnxruntime offers only {available}")
    return CUDA in available


def open_session(path: str | Path, cfg: RuntimeConfig = RuntimeConfig(device="cpu"),
                 opts: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A session on CUDA when it really loads (ORT silently falls back to CPU otherwise), else CPU."""
    opts = opts or session_options(cfg)
    if wants_cuda(cfg):
        _preload_cuda_libraries()
        try:
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=[(CUDA, cuda_options(cfg)), CPU])
            if sess.get_providers()[0] == CUDA:
                return sess
            reason = "it fell back to CPU"
        except Exception as e:  # noqa: BLE001 - a broken CUDA install raises anything
            reason = str(e)
        if cfg.device == "cuda":
            raise DeviceUnavailable(f"device=cuda but the CUDA execution provider did not load: {reason}")
        log.warning("CUDA execution provider did not load (%s); using CPU", reason)
    return ort.InferenceSession(str(path), sess_options=opts, providers=[CPU])


def gpu_name(device_id: int = 0) -> str | None:
    """The name of the GPU a CUDA session runs on ("NVIDIA H200"), or None when it cannot be told.

    ONNX Runtime does not report it, so ask NVML (nvidia-ml-py, in the [gpu] extra) and fall back
    to the driver's /proc file. NVML counts every GPU while CUDA counts only CUDA_VISIBLE_DEVICES,
    so the CUDA index is mapped through that variable first.
    """
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    ref = visible[device_id] if device_id < len(visible) else str(device_id)
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = (pynvml.nvmlDeviceGetHandleByIndex(int(ref)) if ref.isdigit()
                      else pynvml.nvmlDeviceGetHandleByUUID(ref))
            name = pynvml.nvmlDeviceGetName(handle)
            return name.decode() if isinstance(name, bytes) else name
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001 - no NVML (not installed, no driver): try the driver's files
        log.debug("NVML gives no GPU name (%s)", e)
    infos = sorted(Path("/proc/driver/nvidia/gpus").glob("*/information"))
    if ref.isdigit() and int(ref) < len(infos):
        for line in infos[int(ref)].read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model":
                return value.strip()
    return None


def cuda_device_id(sess: ort.InferenceSession) -> int:
    """The CUDA device a session runs on (its provider option, 0 unless set)."""
    return int(sess.get_provider_options().get(CUDA, {}).get("device_id", 0))


def device_name(sess: ort.InferenceSession) -> str:
    """'cuda' or 'cpu': where a session's graph runs."""
    return "cuda" if sess.get_providers()[0] == CUDA else "cpu"
