"""``training.export.export_bundle`` onto a folder that already holds a bundle: a failed export (parity
check, round-trip load, the swap itself, Ctrl-C) leaves the old bundle byte-for-byte as it was and no
sibling folder behind; a good one replaces the folder whole. And a manifest records no machine-local
absolute paths."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import export_tiny_bundle, random_images

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from service.bundle import DEFAULT_BUNDLE, Bundle, BundleError
from service.runtime.parity import check as parity_check
from training import export
from training.data import describe_sources, portable_path, portable_paths, portable_sources


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: sha256 of each file's bytes, "dir" for each folder."""
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory) -> Path:
    """The bundle already in place (one level, seed 1: other weights than the exports below)."""
    return export_tiny_bundle(tmp_path_factory.mktemp("old") / "bundle", seed=1, levels=1)


@pytest.fixture
def shipped(old_bundle, tmp_path) -> Path:
    """A copy of the old bundle at ``artifacts/default``, alone in its parent folder."""
    out = tmp_path / "artifacts" / "default"
    shutil.copytree(old_bundle, out)
    (out / "notes.txt").write_text("a file the export does not write")
    return out


class Boom(Exception):
    pass


def failing_check(seen: list[Path], error: BaseException):
    def check(files, sampling, reference):
        seen.extend(files.values())
        raise error
    return check


@pytest.mark.parametrize("failure", ["parity", "interrupt", "round_trip", "swap"])
def test_a_failed_export_leaves_the_previous_bundle_untouched(shipped, monkeypatch, failure):
    before = tree_digest(shipped)
    seen: list[Path] = []
    check = parity_check
    if failure == "parity":
        check = failing_check(seen, Boom("ONNX Runtime disagrees with PyTorch"))
    elif failure == "interrupt":
        check = failing_check(seen, KeyboardInterrupt())
    elif failure == "round_trip":
        def load(root, verify=True):
            raise BundleError("round-trip load failed")
        monkeypatch.setattr(export.Bundle, "load", staticmethod(load))
    else:  # the new folder cannot be renamed in after the old one was renamed aside
        rename = Path.rename

        def flaky_rename(self, target):
            if ".exporting-" in self.name:
                raise OSError("rename failed")
            return rename(self, target)
        monkeypatch.setattr(Path, "rename", flaky_rename)
    expected = {"parity": Boom, "interrupt": KeyboardInterrupt, "round_trip": BundleError, "swap": OSError}[failure]
    with pytest.raises(expected):
        export_tiny_bundle(shipped, levels=1, check=check)
    if seen:  # the graphs were written into a sibling folder, never into the bundle in place
        assert {p.parent.parent for p in seen} == {shipped.parent} and {p.parent for p in seen} != {shipped}
    assert tree_digest(shipped) == before
    assert sorted(p.name for p in shipped.parent.iterdir()) == ["default"]  # no sibling left behind


def test_a_good_export_replaces_the_bundle(shipped, old_bundle):
    old = Bundle.load(old_bundle).manifest
    export_tiny_bundle(shipped, levels=1)
    new = Bundle.load(shipped)  # verifies every sha256
    assert new.manifest["files"] != old["files"]  # other weights
    assert not (shipped / "notes.txt").exists()  # the folder is replaced whole, as before
    assert sorted(p.name for p in shipped.parent.iterdir()) == ["default"]
    assert shipped.stat().st_mode & 0o777 == old_bundle.stat().st_mode & 0o777  # not a private temp folder


def test_an_export_creates_a_missing_folder(tmp_path):
    out = tmp_path / "new" / "bundle"
    export_tiny_bundle(out, levels=1)
    assert Bundle.load(out).name == "tiny-1"
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"]


# -- no machine-local paths -----------------------------------------------------------------------
def absolute_paths(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in absolute_paths(v)]
    if isinstance(value, list):
        return [s for v in value for s in absolute_paths(v)]
    if isinstance(value, str):
        return [value] if any(part.strip().startswith("/") for part in value.split(",")) else []
    return []


def test_portable_paths():
    repo = Path(export.__file__).resolve().parents[1]
    assert portable_path("/work/shared/data/imagenet-samples") == "imagenet-samples"
    assert portable_path("/home/someone/runs/ft/vqvae/checkpoint.pt") == "vqvae/checkpoint.pt"
    assert portable_path(repo / "artifacts" / "default") == "artifacts/default"
    assert portable_path("data/images") == "data/images"  # relative: as given, not resolved
    assert portable_path("") == "" and portable_path("photos") == "photos"
    assert portable_sources("/work/shared/data/imagenet-samples, photos") == "imagenet-samples,photos"
    report = {"data": "/srv/a,photos", "runs": ["/tmp/x/run/checkpoint.pt"], "steps": 3,
              "terms": "see /usr/share/doc for the licence"}  # prose that mentions a path stays
    assert portable_paths(report) == {"data": "a,photos", "runs": ["run/checkpoint.pt"], "steps": 3,
                                      "terms": "see /usr/share/doc for the licence"}


def test_an_export_records_no_machine_local_paths(tmp_path):
    folder = tmp_path / "my-images"
    folder.mkdir()
    for i, img in enumerate(random_images(12, size=16, seed=2)):
        Image.fromarray(img).save(folder / f"img{i}.png")
    data = describe_sources(f"{folder},photos", 0.3, 256)
    assert [s["source"] for s in data["sources"]] == ["my-images", "photos"]
    run = tmp_path / "runs" / "vqvae"
    training = {"vqvae": {"data": f"{folder},photos", "init": str(tmp_path / "prev"),
                          "checkpoint": str(run / "checkpoint.pt")}}
    metrics = {"data": f"{folder},photos", "training": training, "reconstruction": {"psnr": 20.0}}
    out = tmp_path / "bundle"
    export_tiny_bundle(out, levels=1, data=data, training=training, metrics=metrics)
    manifest = json.loads((out / "manifest.json").read_text())
    assert str(tmp_path) not in (out / "manifest.json").read_text()
    assert absolute_paths({k: manifest[k] for k in ("data", "training", "metrics")}) == []
    assert manifest["training"]["vqvae"] == {"data": "my-images,photos", "init": "prev",
                                             "checkpoint": "vqvae/checkpoint.pt"}
    assert manifest["metrics"]["reconstruction"] == {"psnr": 20.0}


@pytest.mark.skipif(not (DEFAULT_BUNDLE / "manifest.json").exists(), reason="no shipped bundle")
def test_the_shipped_manifest_records_no_machine_local_paths():
    manifest = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())
    assert absolute_paths({k: manifest.get(k) for k in ("data", "training", "metrics")}) == []
