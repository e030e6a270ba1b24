"""What a tokenize job produces, and the one way its files are written (both shard formats use it)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.bundle import Bundle, version_id


@dataclass(frozen=True)
class BundleId:
    """The bundle a job's codes come from: its name, its manifest's sha256 (what resume checks) and the
    version id the service tags its codes with (what a decode request sends back)."""
    name: str
    sha256: str
    version: str = field(default="", compare=False)  # derived from sha256: a resume compares the sha256

    def __post_init__(self):
        if not self.version:
            object.__setattr__(self, "version", version_id(self.sha256))

    @classmethod
    def of(cls, bundle: Bundle) -> BundleId:
        return cls(bundle.name, bundle.sha256, bundle.version_id())


@dataclass
class Encoded:
    """A batch of results: paths, source sizes [n, 2] (height, width) and one int grid per level."""
    paths: list[str]
    sizes: np.ndarray
    codes: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.paths)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(final: Path, payload: bytes) -> None:
    """``final`` appears whole or not at all; on any OSError nothing is left and the error propagates."""
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
