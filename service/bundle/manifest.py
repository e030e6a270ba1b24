"""The bundle: a directory of ONNX graphs plus ``manifest.json``, the one source of shapes and names.

Training writes it (``training.export``), the runtime and the API read it. Level names, strides,
codebook sizes, graph names and the sampling section all come from here; nothing else in the
project spells out "top" or "bottom".

Loading checks the manifest's structure (a missing key is a one-line ``BundleError``), keeps every
listed path inside the bundle folder (no ``..``, no absolute paths, no symlink leading out) and
verifies every file's sha256 before anything runs. numpy-free and torch-free.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# The shipped bundle, next to the packages (an editable install or a checkout).
DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "artifacts" / "default"

# Graph names. Per-level priors are "prior_<level>"; their step graphs are listed under "sampling".
ENCODER, DECODER = "encoder", "decoder"
# What the cached sampler reads of each level's ``sampling`` entry ("cond" is optional).
SAMPLING_KEYS = ("row", "pixel", "num_codes", "pad_code", "vcache", "hcache")


ID_CHARS = 12  # hex digits of the manifest's sha256 in a version id (more when two loaded ones share them)


def version_id(sha256: str, taken: set[str] = frozenset()) -> str:
    n = ID_CHARS
    while any(t.startswith(sha256[:n]) or sha256.startswith(t) for t in taken) and n < len(sha256):
        n += 4
    return sha256[:n]


class BundleError(RuntimeError):
    """A bundle that cannot be used: missing or malformed manifest, missing file, checksum mismatch."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prior_graph(level: str) -> str:
    return f"prior_{level}"


@dataclass(frozen=True)
class Level:
    name: str
    stride: int
    codebook_size: int
    embedding_dim: int

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.stride, width // self.stride


def _require(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise BundleError(f"{where}: the manifest has no {key!r}")
    return mapping[key]


def _inside(root: Path, rel: str, what: str) -> Path:
    """``root / rel``, refusing anything that leaves ``root`` (``..``, absolute, a symlink out)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise BundleError(f"bundle file {what}: path {rel!r} must be relative and stay inside the bundle folder")
    path = root / rel
    try:
        resolved_root = root.resolve()
        if not path.resolve().is_relative_to(resolved_root):
            raise BundleError(f"bundle file {what}: {rel!r} leads outside the bundle folder")
    except OSError as e:  # a symlink loop, say
        raise BundleError(f"bundle file {what}: {rel!r} cannot be resolved ({e.strerror})") from None
    return path


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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(manifest, dict):
            raise BundleError(f"{path}: the manifest must be a JSON object")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
        bundle = cls(root, manifest)
        bundle._check_structure(str(path))
        if verify:
            bundle.verify()
        return bundle

    def _check_structure(self, where: str) -> None:
        for key in ("name", "image_size", "levels", "files"):
            _require(self.manifest, key, where)
        levels = self.manifest["levels"]
        if not isinstance(levels, list) or not levels:
            raise BundleError(f"{where}: 'levels' must be a non-empty list")
        for i, lv in enumerate(levels):
            for key in ("name", "stride", "codebook_size", "embedding_dim"):
                _require(lv, key, f"{where}: levels[{i}]")
        files = self.manifest["files"]
        if not isinstance(files, dict):
            raise BundleError(f"{where}: 'files' must be an object")
        for name, entry in files.items():
            _require(entry, "path", f"{where}: files.{name}")
            _require(entry, "sha256", f"{where}: files.{name}")
            _inside(self.root, entry["path"], name)
        for graph in (ENCODER, DECODER):
            if graph not in files:
                raise BundleError(f"{where}: the manifest lists no {graph} graph")
        self._check_sampling(where, files)

    def _check_sampling(self, where: str, files: dict) -> None:
        """The cached-sampling section (optional): every key the sampler reads, every graph listed."""
        sampling = self.manifest.get("sampling", {})
        if not isinstance(sampling, dict):
            raise BundleError(f"{where}: 'sampling' must be an object")
        for level, info in sampling.items():
            for key in SAMPLING_KEYS:
                _require(info, key, f"{where}: sampling.{level}")
            for role in ("row", "pixel", "cond"):
                graph = info.get(role)
                if graph is not None and graph not in files:
                    raise BundleError(f"{where}: sampling.{level}.{role} names {graph!r}, which 'files' does not list")

    def verify(self) -> None:
        for name, entry in self.manifest["files"].items():
            path = _inside(self.root, entry["path"], name)
            if not path.is_file():
                raise BundleError(f"bundle file {entry['path']} ({name}) is missing from {self.root}")
            if sha256_file(path) != entry["sha256"]:
                # Never print the file's digest: the message must not reveal anything about its bytes.
                raise BundleError(f"bundle file {entry['path']} ({name}) is corrupt: its sha256 does not match "
                                  "the manifest's")

    # -- typed views ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def levels(self) -> dict[str, Level]:
        """Levels in manifest order: coarsest first, which is also the sampling order."""
        return {lv["name"]: Level(**{k: lv[k] for k in ("name", "stride", "codebook_size", "embedding_dim")})
                for lv in self.manifest["levels"]}

    @property
    def level_names(self) -> list[str]:
        return [lv["name"] for lv in self.manifest["levels"]]

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of the coarsest stride."""
        return max(lv.stride for lv in self.levels.values())

    @property
    def sampling(self) -> dict[str, Any]:
        """Per level: the cached-sampling step graphs and cache shapes (absent in old bundles)."""
        return self.manifest.get("sampling", {})

    def cond_level(self, level: str) -> str | None:
        """The level a level's prior is conditioned on: the next coarser one, if its prior takes it."""
        names = self.level_names
        i = names.index(level)
        info = self.sampling.get(level, {})
        return names[i - 1] if i > 0 and info.get("cond") else None

    @property
    def can_sample(self) -> bool:
        return all(self.has(prior_graph(name)) for name in self.level_names)

    @property
    def sha256(self) -> str:
        """One digest for the whole bundle: of the manifest's bytes, which hold every file's digest."""
        return sha256_file(self.root / MANIFEST)

    def version_id(self, taken: set[str] = frozenset()) -> str:
        """The version id codes are tagged with: the shortest prefix of ``sha256`` (at least ``ID_CHARS``
        hex digits) that no id in ``taken`` (the other loaded bundles') shares."""
        return version_id(self.sha256, taken)

    def has(self, graph: str) -> bool:
        return graph in self.manifest["files"]

    def path(self, graph: str) -> Path:
        try:
            return self.root / self.manifest["files"][graph]["path"]
        except KeyError:
            raise BundleError(f"bundle {self.root} has no {graph!r} graph") from None
