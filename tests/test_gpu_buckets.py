"""Batch buckets (what the CUDA path does), exercised on CPU with buckets forced on: padding and
unpadding give the same results as unpadded runs, only bucket sizes reach a session, every bucket is
warmed at start-up, and a new fit=none size is warmed once and counted in /metrics."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_SIZE, random_images
from service_support import image_files, metric_value, png_bytes, run, serving

from service.bundle import DECODER, ENCODER, Bundle
from service.bundle.sampling import noise_for
from service.runtime.backend import OrtBackend
from service.runtime.buckets import bucket_for, buckets_up_to, pad_rows
from service.runtime.session import RuntimeConfig


def test_bucket_arithmetic():
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 8, 9, 17, 32, 33)] == [1, 2, 4, 4, 8, 8, 16, 32, 32, 64]
    assert buckets_up_to(32) == [1, 2, 4, 8, 16, 32]
    assert buckets_up_to(20) == [1, 2, 4, 8, 16, 32]  # a batch of 20 lands in 32
    assert buckets_up_to(1) == [1]
    with pytest.raises(ValueError):
        bucket_for(0)
    a = np.arange(6).reshape(3, 2)
    assert pad_rows(a, 3) is a
    padded = pad_rows(a, 4, fill=7)
    assert padded.shape == (4, 2) and (padded[:3] == a).all() and (padded[3] == 7).all()


class Recorder:
    """A session stand-in that passes runs through and records the batch size of each."""

    def __init__(self, sess):
        self.sess, self.batches = sess, []

    def run(self, outputs, feeds):
        self.batches.append(len(next(iter(feeds.values()))))
        return self.sess.run(outputs, feeds)

    def __getattr__(self, name):
        return getattr(self.sess, name)


@pytest.fixture(scope="module")
def plain(tiny_bundle):
    return OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1))


def bucketed(tiny_bundle, max_batch: int = 8) -> OrtBackend:
    backend = OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1, buckets=True,
                                                                 warmup_batch=max_batch, sample_warmup_batch=4))
    for graph in (ENCODER, DECODER):
        backend.sessions[graph] = Recorder(backend.sessions[graph])
    return backend


def test_buckets_are_off_on_cpu_by_default(plain):
    assert plain.buckets is False and plain.gpu_name is None


def test_padded_results_equal_unpadded(tiny_bundle, plain):
    backend = bucketed(tiny_bundle)
    images = random_images(5, seed=11)
    codes = backend.encode(images)
    assert backend.sessions[ENCODER].batches[-1] == 8  # 5 ran as 8
    want = plain.encode(images)
    for level in want:
        assert codes[level].shape == want[level].shape and (codes[level] == want[level]).all()
    pixels = backend.decode(codes)
    assert backend.sessions[DECODER].batches[-1] == 8
    assert pixels.shape == (5, TINY_SIZE, TINY_SIZE, 3) and (pixels == plain.decode(want)).all()
    # Sampling pads n too (3 -> 4) and gives each sample the codes it gets alone.
    noise = noise_for(backend.bundle, 5, 3)
    args = (np.array([1.0, 0.7, 1.3], np.float32), np.array([0, 5, 0], np.int64))
    got, ref = backend.sample(noise, *args), plain.sample(noise, *args)
    for level in ref:
        assert got[level].shape == ref[level].shape and (got[level] == ref[level]).all()


def test_warmup_runs_every_bucket_and_new_sizes_are_warmed_once(tiny_bundle):
    backend = bucketed(tiny_bundle, max_batch=8)
    backend.warmup()
    enc = backend.sessions[ENCODER]
    assert set(enc.batches) == {1, 2, 4, 8} and set(backend.sessions[DECODER].batches) == {1, 2, 4, 8}
    assert sum(backend.size_warmups.values()) == 0  # the bundle's own size is warmed at start-up, not counted
    enc.batches.clear()
    backend.encode(random_images(3, seed=1))
    assert enc.batches == [4]  # warm already: no extra runs
    # A native (fit=none) size seen for the first time: every bucket once, then the batch itself.
    wide = np.zeros((3, TINY_SIZE, TINY_SIZE + 16, 3), np.uint8)
    enc.batches.clear()
    backend.encode(wide)
    assert enc.batches == [1, 2, 4, 8, 4]
    assert backend.size_warmups["encode"] == 1 and backend.size_warmup_seconds["encode"] > 0
    enc.batches.clear()
    backend.encode(wide[:2])
    assert enc.batches == [2] and backend.size_warmups["encode"] == 1


def test_size_warmups_are_exported_as_metrics(tiny_bundle):
    backend = bucketed(tiny_bundle, max_batch=8)

    async def main():
        async with serving(tiny_bundle, backend, max_batch=8) as (_, c):
            text = (await c.get("/metrics")).text
            assert metric_value(text, "vqtok_size_warmups_total", op="encode") == 0
            wide = random_images(1, size=TINY_SIZE + 8, seed=2)
            r = await c.post("/v1/encode", params={"fit": "none"}, files=image_files([png_bytes(wide[0])]))
            assert r.status_code == 200, r.text
            assert len(r.json()["items"][0]["top"]) == (TINY_SIZE + 8) // 8
            text = (await c.get("/metrics")).text
            assert metric_value(text, "vqtok_size_warmups_total", op="encode") == 1
            assert metric_value(text, "vqtok_size_warmup_seconds_total", op="encode") > 0
            info = (await c.get("/v1/model")).json()
            assert info["device"] == "cpu" and info["gpu"] is None

    run(main())


def test_small_sampling_batches_go_to_the_cpu_sampler(tiny_bundle, plain):
    """On CUDA the backend builds ``cpu_sampler`` itself (n <= cpu_sample_max); the routing is the same here."""
    from service.runtime.sampler import PriorSampler

    backend = OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1, buckets=True,
                                                                 cpu_sample_max=2))
    assert backend.cpu_sampler is None  # not on a CPU provider
    calls = []

    class Counting(PriorSampler):
        def sample(self, noise, temperature, top_k, should_stop):
            calls.append(len(next(iter(noise.values()))))
            return super().sample(noise, temperature, top_k, should_stop)

    backend.cpu_sampler = Counting(backend.bundle, cfg=RuntimeConfig(device="cpu", intra_op_threads=1))
    for n in (1, 2, 3):
        args = (noise_for(backend.bundle, n, n), np.ones(n, np.float32), np.zeros(n, np.int64))
        got, ref = backend.sample(*args), plain.sample(*args)
        assert all((got[k] == ref[k]).all() for k in ref)
    assert calls == [1, 2]  # n = 3 went to the main sampler (padded to 4)
