"""Hostile bundles (issue 10, item 13): manifest paths stay inside the bundle folder, errors never
print digests of files outside it, and a manifest with missing keys is a one-line error."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from service.api.server import serve
from service.bundle import Bundle, BundleError

HEX64 = re.compile(r"[0-9a-f]{64}")


def _copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def _edit(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _one_line_refusal(bundle: Path, capsys) -> str:
    """``vqtok serve`` on the bundle refuses to start with exit status 2 and one line, no traceback."""
    assert serve(model_dir=bundle) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("path", ["../outside.onnx", "sub/../../outside.onnx", "/etc/hostname", "", 7])
def test_paths_must_stay_inside_the_bundle(tiny_bundle, tmp_path, capsys, path):
    bundle = _copy(tiny_bundle, tmp_path)
    (tmp_path / "outside.onnx").write_bytes((bundle / "encoder.onnx").read_bytes())

    def point_outside(m):
        m["files"]["encoder"]["path"] = path

    _edit(bundle, point_outside)
    with pytest.raises(BundleError, match="inside the bundle folder"):
        Bundle.load(bundle)
    assert "encoder" in _one_line_refusal(bundle, capsys)


def test_a_symlink_leading_out_is_refused_and_nothing_about_its_target_is_printed(tiny_bundle, tmp_path, capsys):
    bundle = _copy(tiny_bundle, tmp_path)
    secret = tmp_path / "secret.key"
    secret.write_bytes(b"not for anyone's eyes")
    (bundle / "decoder.onnx").unlink()
    (bundle / "decoder.onnx").symlink_to(secret)
    with pytest.raises(BundleError, match="leads outside the bundle folder") as e:
        Bundle.load(bundle)
    assert "secret" not in str(e.value) and not HEX64.search(str(e.value))
    assert not HEX64.search(_one_line_refusal(bundle, capsys))
    # A symlink that stays inside the folder is fine.
    (bundle / "decoder.onnx").unlink()
    shutil.copy(tiny_bundle / "decoder.onnx", bundle / "real_decoder.onnx")
    (bundle / "decoder.onnx").symlink_to(bundle / "real_decoder.onnx")
    Bundle.load(bundle)


def test_a_corrupt_file_names_itself_but_no_digest(tiny_bundle, tmp_path, capsys):
    bundle = _copy(tiny_bundle, tmp_path)
    with open(bundle / "decoder.onnx", "r+b") as f:
        f.seek(50)
        f.write(b"\x00\x01\x02")
    err = _one_line_refusal(bundle, capsys)
    assert "decoder.onnx" in err and "corrupt" in err
    assert not HEX64.search(err)


def _drop(*keys):
    def change(m):
        target = m
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]
    return change


@pytest.mark.parametrize("keys", [("name",), ("levels",), ("files",), ("image_size",), ("levels", 0, "stride"),
                                  ("levels", 1, "codebook_size"), ("files", "encoder", "sha256"),
                                  ("files", "decoder", "path"), ("files", "encoder"), ("sampling", "top", "row"),
                                  ("sampling", "bottom", "pad_code"), ("sampling", "top", "vcache")])
def test_missing_keys_are_one_line_errors(tiny_bundle, tmp_path, capsys, keys):
    bundle = _copy(tiny_bundle, tmp_path)
    _edit(bundle, _drop(*keys))
    err = _one_line_refusal(bundle, capsys)
    assert repr(keys[-1]) in err or str(keys[-1]) in err, err
