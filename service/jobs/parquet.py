"""Parquet shards for training pipelines (needs pyarrow: the ``[parquet]`` extra).

One row per image: ``path`` (relative to DIR), ``height`` and ``width`` of the source image,
one column per level holding its uint16 [h, w] grid, ``bundle_version`` (the id ``/v1/decode`` takes back),
and ``bundle`` / ``bundle_sha256`` (the
model the codes belong to; dictionary-encoded, so they cost nothing per row). A level column is
Arrow's fixed-shape tensor type (stored as a fixed-size list of uint16), so pyarrow reads a whole
column back as one numpy array, and any Parquet reader sees plain lists:

    import pyarrow.parquet as pq
    table = pq.read_table("OUT/shard-000000.parquet")
    top = table["top"].combine_chunks().to_numpy_ndarray()   # uint16 [n, h, w]
"""
from __future__ import annotations

from pathlib import Path

from service.jobs.records import BundleId, Encoded, write_atomic


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise SystemExit(f"Parquet shards need pyarrow: pip install 'vqtok[parquet]' ({e})") from None
    return pa, pq


def shard_table(rows: Encoded, bundle: BundleId):
    pa, _ = _pyarrow()
    n = len(rows)
    columns = {
        "path": pa.array(rows.paths, pa.string()),
        "height": pa.array(rows.sizes[:, 0], pa.int32()),
        "width": pa.array(rows.sizes[:, 1], pa.int32()),
    }
    for level, grids in rows.codes.items():
        columns[level] = pa.FixedShapeTensorArray.from_numpy_ndarray(grids)
    columns["bundle"] = pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int32()), [bundle.name])
    columns["bundle_sha256"] = pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int32()), [bundle.sha256])
    # The version id the service tags these codes with: send it back with them to /v1/decode.
    columns["bundle_version"] = pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int32()), [bundle.version])
    return pa.table(columns)


def write_parquet(path: Path, rows: Encoded, bundle: BundleId) -> None:
    """Write one shard atomically (same rules as the npz shards)."""
    pa, pq = _pyarrow()
    sink = pa.BufferOutputStream()
    pq.write_table(shard_table(rows, bundle), sink, compression="zstd")
    write_atomic(path, sink.getvalue().to_pybytes())
