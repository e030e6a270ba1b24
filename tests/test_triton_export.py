"""``vqtok export-triton``: every config.pbtxt parses with Triton's own schema (tritonclient's
model_config_pb2, so a misspelt field or enum fails) and describes the ONNX graph next to it:
names, data types, dims (batch dimension implicit), max_batch_size, dynamic batching; the
reconstruct ensemble wires encoder outputs to decoder inputs with matching types."""
from __future__ import annotations

import numpy as np
import pytest

from service.bundle import DEFAULT_BUNDLE, Bundle
from service.cli import main
from service.runtime.session import open_session
from service.runtime.triton import RECONSTRUCTION, TRITON_TYPES

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient[grpc] (the dev extra) holds Triton's config schema")


def _config(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _dtype(config_type: int) -> str:
    return model_config_pb2.DataType.Name(config_type)


def _graph_io(sess):
    """name -> (Triton data type, dims without batch, -1 where symbolic), inputs and outputs."""
    def describe(args):
        return {a.name: (TRITON_TYPES[a.type], [d if isinstance(d, int) else -1 for d in a.shape[1:]]) for a in args}
    return describe(sess.get_inputs()), describe(sess.get_outputs())


def _tensors(entries):
    return {t.name: (_dtype(t.data_type), list(t.dims)) for t in entries}


@pytest.mark.parametrize("bundle_dir", ["tiny", "default"])
def test_every_config_matches_its_graph(bundle_dir, tiny_bundle, tmp_path, capsys):
    src = tiny_bundle if bundle_dir == "tiny" else DEFAULT_BUNDLE
    repo = tmp_path / "models"
    assert main(["export-triton", str(src), str(repo), "--max-batch", "48", "--max-delay-us", "500"]) == 0
    assert '"models": ["encoder", "decoder", "reconstruct"]' in capsys.readouterr().out
    bundle = Bundle.load(src)

    graphs = {}
    for name in ("encoder", "decoder"):
        cfg = _config(repo / name / "config.pbtxt")
        onnx = repo / name / "1" / "model.onnx"
        assert onnx.read_bytes() == bundle.path(name).read_bytes()
        assert (cfg.name, cfg.platform, cfg.max_batch_size) == (name, "onnxruntime_onnx", 48)
        assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == 500
        inputs, outputs = _graph_io(open_session(onnx))
        assert _tensors(cfg.input) == inputs
        assert _tensors(cfg.output) == outputs
        graphs[name] = (inputs, outputs)
    assert list(graphs["encoder"][1]) == bundle.level_names  # one code grid per level, in manifest order

    ens = _config(repo / "reconstruct" / "config.pbtxt")
    assert (ens.platform, ens.max_batch_size) == ("ensemble", 48)
    assert (repo / "reconstruct" / "1").is_dir()
    enc_in, enc_out = graphs["encoder"]
    dec_out = graphs["decoder"][1]
    assert _tensors(ens.input) == enc_in
    assert _tensors(ens.output) == {RECONSTRUCTION: next(iter(dec_out.values())), **enc_out}
    # Walk the steps: every step input must exist (an ensemble input or an earlier output) with the
    # type and dims the step's model expects; every ensemble output must be produced.
    available = dict(_tensors(ens.input))
    for step in ens.ensemble_scheduling.step:
        inputs, outputs = graphs[step.model_name]
        assert set(step.input_map) == set(inputs) and set(step.output_map) == set(outputs)
        for model_input, tensor in step.input_map.items():
            assert available[tensor] == inputs[model_input], (step.model_name, model_input)
        for model_output, tensor in step.output_map.items():
            available[tensor] = outputs[model_output]
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["encoder", "decoder"]
    assert all(available[name] == spec for name, spec in _tensors(ens.output).items())


def test_the_ensemble_computes_what_the_service_computes(tiny_bundle, tmp_path):
    """Running the steps as the ensemble wires them, in ONNX Runtime, gives the bundle's reconstruction."""
    from service.runtime.backend import OrtBackend
    from service.runtime.session import RuntimeConfig

    repo = tmp_path / "models"
    assert main(["export-triton", str(tiny_bundle), str(repo)]) == 0
    ens = _config(repo / "reconstruct" / "config.pbtxt")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    tensors = {"images": images}
    for step in ens.ensemble_scheduling.step:
        sess = open_session(repo / step.model_name / "1" / "model.onnx")
        outs = sess.run(list(step.output_map), {k: tensors[v] for k, v in step.input_map.items()})
        tensors.update({step.output_map[k]: v for k, v in zip(step.output_map, outs)})
    backend = OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu"))
    assert np.array_equal(tensors[RECONSTRUCTION], backend.decode(backend.encode(images)))


def test_refuses_a_non_empty_repository(tiny_bundle, tmp_path):
    (tmp_path / "keep.txt").write_text("someone's file")
    with pytest.raises(SystemExit, match="not empty"):
        main(["export-triton", str(tiny_bundle), str(tmp_path)])
