"""The bundle: a directory of ONNX graphs plus ``manifest.json``, the one source of shapes.

Loading verifies every listed file's sha256 before anything runs, and names the file that is
missing or corrupt. This module imports no torch: the service and the exporter both use it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """A bundle that cannot be used: missing manifest, missing file, or checksum mismatch."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Level:
    name: str
    stride: int
    codebook_size: int
    embedding_dim: int

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.stride, width // self.stride


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, root: str | Path, verify: bool = True) -> Bundle:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise BundleError(f"no {MANIFEST} in {root}")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"{path} is not valid JSON: {e}") from e
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        for name, entry in self.manifest["files"].items():
            path = self.root / entry["path"]
            if not path.is_file():
                raise BundleError(f"bundle file {entry['path']} ({name}) is missing from {self.root}")
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                raise BundleError(f"bundle file {entry['path']} ({name}) is corrupt: sha256 {actual} "
                                  f"does not match the manifest's {entry['sha256']}")

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def levels(self) -> dict[str, Level]:
        return {lv["name"]: Level(**lv) for lv in self.manifest["levels"]}

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of the coarsest stride."""
        return max(lv.stride for lv in self.levels.values())

    def has(self, graph: str) -> bool:
        return graph in self.manifest["files"]

    def path(self, graph: str) -> Path:
        try:
            return self.root / self.manifest["files"][graph]["path"]
        except KeyError:
            raise BundleError(f"bundle {self.root} has no {graph!r} graph") from None
