"""``vqtok export-triton BUNDLE OUT``: a Triton Inference Server model repository for a bundle.

    OUT/encoder/config.pbtxt      OUT/encoder/1/model.onnx
    OUT/decoder/config.pbtxt      OUT/decoder/1/model.onnx
    OUT/reconstruct/config.pbtxt  OUT/reconstruct/1/          (an ensemble: encoder, then decoder)

Every config comes from the graphs themselves: ONNX Runtime reads each graph's input and output
names, element types and shapes (torch-free, no ``onnx`` package needed), so the configs cannot
drift from the manifest's graphs. The first dimension of every tensor is the batch (dynamic in
every vqtok graph) and becomes Triton's implicit batch dimension; other symbolic dimensions
become -1. Models use the ``onnxruntime_onnx`` platform with dynamic batching. Triton picks GPU
instances when it has GPUs (no ``instance_group`` is written). Sampling is not exported: the
priors' autoregressive loop needs a client-side or BLS loop, which the vqtok service provides.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from service.bundle import DECODER, ENCODER, Bundle
from service.runtime.session import RuntimeConfig, open_session

PLATFORM = "onnxruntime_onnx"
RECONSTRUCT = "reconstruct"
RECONSTRUCTION = "reconstruction"  # the ensemble's image output (its input is already called "images")

# ONNX Runtime's element type names -> Triton's data types.
TRITON_TYPES = {
    "tensor(uint8)": "TYPE_UINT8", "tensor(int8)": "TYPE_INT8", "tensor(uint16)": "TYPE_UINT16",
    "tensor(int16)": "TYPE_INT16", "tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64",
    "tensor(float16)": "TYPE_FP16", "tensor(float)": "TYPE_FP32", "tensor(double)": "TYPE_FP64",
    "tensor(bool)": "TYPE_BOOL",
}


@dataclass(frozen=True)
class TritonConfig:
    max_batch_size: int = 64
    max_queue_delay_us: int = 2000  # dynamic batching: how long Triton may wait for a fuller batch


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # TYPE_*
    dims: tuple[int, ...]  # without the batch dimension; -1 where dynamic

    def pbtxt(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        return f'  {{\n    name: "{self.name}"\n    data_type: {self.data_type}\n    dims: [ {dims} ]\n  }}'


def _tensor(arg, graph: str) -> Tensor:
    if arg.type not in TRITON_TYPES:
        raise ValueError(f"{graph}: tensor {arg.name!r} has type {arg.type}, which Triton's ONNX backend lacks")
    batch, *rest = arg.shape
    if isinstance(batch, int):
        raise ValueError(  # noqa: TRY004 - a value of the graph, not a wrong argument type
            f"{graph}: tensor {arg.name!r} has a fixed first dimension ({batch}); Triton's dynamic "
            "batching needs it dynamic")
    return Tensor(arg.name, TRITON_TYPES[arg.type], tuple(d if isinstance(d, int) else -1 for d in rest))


def signature(path: Path, graph: str) -> tuple[list[Tensor], list[Tensor]]:
    """The inputs and outputs of an ONNX graph, as Triton sees them."""
    sess = open_session(path, RuntimeConfig(device="cpu", intra_op_threads=1))
    return [_tensor(a, graph) for a in sess.get_inputs()], [_tensor(a, graph) for a in sess.get_outputs()]


def _block(key: str, tensors: list[Tensor]) -> str:
    return f"{key} [\n" + ",\n".join(t.pbtxt() for t in tensors) + "\n]\n"


def _header(name: str, platform: str, bundle: Bundle, cfg: TritonConfig) -> str:
    return (f"# written by vqtok export-triton from bundle {bundle.name!r} (manifest sha256 {bundle.sha256})\n"
            f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {cfg.max_batch_size}\n')


def model_config(name: str, bundle: Bundle, inputs: list[Tensor], outputs: list[Tensor], cfg: TritonConfig) -> str:
    return (_header(name, PLATFORM, bundle, cfg) + _block("input", inputs) + _block("output", outputs)
            + f"dynamic_batching {{\n  max_queue_delay_microseconds: {cfg.max_queue_delay_us}\n}}\n")


def _map(key: str, pairs: list[tuple[str, str]]) -> str:
    return "".join(f'      {key} {{ key: "{k}" value: "{v}" }}\n' for k, v in pairs)


def ensemble_config(bundle: Bundle, enc: tuple[list[Tensor], list[Tensor]], dec: tuple[list[Tensor], list[Tensor]],
                    cfg: TritonConfig) -> str:
    """images -> encoder -> codes -> decoder -> reconstruction; the codes are outputs too."""
    (enc_in, enc_out), (dec_in, dec_out) = enc, dec
    codes = {t.name for t in enc_out}
    missing = [t.name for t in dec_in if t.name not in codes]
    if missing:
        raise ValueError(f"the decoder takes {missing}, which the encoder does not produce")
    image = dec_out[0]
    outputs = [Tensor(RECONSTRUCTION, image.data_type, image.dims), *enc_out]
    steps = [
        (ENCODER, [(t.name, t.name) for t in enc_in], [(t.name, t.name) for t in enc_out]),
        (DECODER, [(t.name, t.name) for t in dec_in], [(image.name, RECONSTRUCTION)]),
    ]
    body = ",\n".join(f'    {{\n      model_name: "{model}"\n      model_version: -1\n' + _map("input_map", ins)
                      + _map("output_map", outs) + "    }" for model, ins, outs in steps)
    return (_header(RECONSTRUCT, "ensemble", bundle, cfg) + _block("input", enc_in) + _block("output", outputs)
            + f"ensemble_scheduling {{\n  step [\n{body}\n  ]\n}}\n")


def export_triton(bundle_dir: Path, out: Path, cfg: TritonConfig = TritonConfig()) -> list[str]:
    """Write the repository; returns the model names. Refuses to overwrite a non-empty OUT."""
    bundle = Bundle.load(bundle_dir)  # verifies every sha256 first
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"vqtok export-triton: {out} is not empty")
    sigs = {}
    for graph in (ENCODER, DECODER):
        sigs[graph] = signature(bundle.path(graph), graph)
        (out / graph / "1").mkdir(parents=True)
        shutil.copyfile(bundle.path(graph), out / graph / "1" / "model.onnx")
        (out / graph / "config.pbtxt").write_text(model_config(graph, bundle, *sigs[graph], cfg))
    (out / RECONSTRUCT / "1").mkdir(parents=True)  # Triton wants a version folder, empty for an ensemble
    (out / RECONSTRUCT / "config.pbtxt").write_text(ensemble_config(bundle, sigs[ENCODER], sigs[DECODER], cfg))
    return [ENCODER, DECODER, RECONSTRUCT]
