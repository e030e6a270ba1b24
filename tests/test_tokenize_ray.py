"""``vqtok tokenize --ray``: the Ray Data pipeline gives the local job's codes, sizes and refusals.

One test (starting Ray takes seconds): a local Ray with 2 CPUs, a small folder with bad files."""
from __future__ import annotations

import numpy as np
import pytest
from tokenize_support import by_path, errors, folder

from service.jobs.local import LocalConfig, run_local
from service.jobs.ray_job import RayConfig, run_ray

ray = pytest.importorskip("ray", reason="the [ray] extra (installed by the dev extra)")


def test_ray_job_gives_the_local_jobs_codes(tiny_bundle, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    good = folder(root)
    local = run_local(LocalConfig(root=root, out=tmp_path / "local", model=tiny_bundle, device="cpu", workers=1))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        cfg = RayConfig(root=root, out=tmp_path / "ray", model=tiny_bundle, device="cpu", batch=4, chunk=2,
                        shard_size=4)
        report = run_ray(cfg)
        # Resuming on Ray: nothing left to do.
        again = run_ray(cfg)
    finally:
        ray.shutdown()
    assert (report.encoded, report.failed, report.deferred) == (local.encoded, local.failed, 0) == (6, 2, 0)
    assert (again.encoded, again.skipped) == (0, 8)
    on_ray, in_process = by_path(tmp_path / "ray"), by_path(tmp_path / "local")
    assert sorted(on_ray) == sorted(in_process) == sorted([*good, "big.jpg"])
    for path, row in on_ray.items():
        for key in ("top", "bottom", "height", "width", "bundle_sha256"):
            assert np.array_equal(row[key], in_process[path][key]), (path, key)
    assert errors(tmp_path / "ray") == errors(tmp_path / "local")
