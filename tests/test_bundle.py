import json
import shutil

import pytest

from service.bundle import Bundle, BundleError


def test_bundle_loads_and_exposes_manifest(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    assert set(bundle.levels) == {"top", "bottom"}
    assert bundle.levels["top"].stride == 8 and bundle.levels["bottom"].stride == 4
    assert bundle.image_size == 32 and bundle.size_multiple == 8
    for graph in ("encoder", "decoder", "prior_top", "prior_bottom"):
        assert bundle.path(graph).is_file()
    manifest = bundle.manifest
    assert manifest["onnx"]["opset"] >= 17 and "pytorch" in manifest["onnx"]["producer"]


def test_tampered_file_is_rejected_by_name(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "decoder.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="decoder.onnx.*corrupt"):
        Bundle.load(copy)


def test_missing_file_and_manifest_are_rejected(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    (copy / "prior_top.onnx").unlink()
    with pytest.raises(BundleError, match="prior_top.onnx.*missing"):
        Bundle.load(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.load(copy)


def test_wrong_format_version_is_rejected(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version"):
        Bundle.load(copy)
