"""Dynamic batching: the batcher on its own (fake batch functions), and batches formed by
concurrent HTTP requests giving exactly the unbatched answers."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from conftest import random_images
from service_support import eventually, image_files, metric_value, png_bytes, run, serving

from service.bundle import Bundle
from service.engine.batcher import Batcher, BatcherConfig
from service.engine.errors import BackendFailed, NotServing, Overloaded, TooLarge
from service.runtime.backend import OrtBackend
from service.runtime.session import RuntimeConfig


class Recorder:
    """A batch function that records its batches and can be held at a gate."""

    def __init__(self):
        self.batches: list[list] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, items):
        self.entered.set()
        self.gate.wait(30)
        self.batches.append(list(items))
        if any(item == "boom" for item in items):
            raise ValueError("boom")
        return [("done", item) for item in items]


def _key(item):
    return item[0] if isinstance(item, tuple) else item


async def _started(fn, **cfg) -> Batcher:
    b = Batcher("test", fn, _key, BatcherConfig(**{"max_batch": 4, "max_delay_s": 0.0, **cfg}))
    b.start()
    return b


def test_batches_group_by_key_split_requests_and_keep_order():
    fn = Recorder()

    async def main():
        b = await _started(fn, max_batch=4, max_delay_s=0.05)
        fn.gate.clear()
        hold = asyncio.ensure_future(b.run(["x"]))
        await asyncio.to_thread(fn.entered.wait, 30)
        items = [("a", i) if i % 3 else ("b", i) for i in range(10)]
        work = asyncio.ensure_future(b.run(items))
        await eventually(lambda: b.depth == 10)
        fn.gate.set()
        out = await work
        await hold
        await b.stop()
        assert out == [("done", it) for it in items]
        batches = fn.batches[1:]
        assert all(len(batch) <= 4 for batch in batches)
        assert all(len({_key(it) for it in batch}) == 1 for batch in batches)  # one shape per batch
        assert sorted(it for batch in batches for it in batch) == sorted(items)

    run(main())


def test_streams_run_batches_at_once_and_stop_fails_the_running_ones():
    together = threading.Barrier(2, timeout=10)

    def both_inside(items):  # returns only while another batch is inside at the same time
        together.wait()
        return [("done", item) for item in items]

    held = Recorder()

    async def main():
        b = await _started(both_inside, max_batch=1, streams=2)
        assert await asyncio.gather(b.run(["a"]), b.run(["b"])) == [[("done", "a")], [("done", "b")]]
        await b.stop()

        b = await _started(held, streams=2)
        held.gate.clear()
        running = asyncio.ensure_future(b.run(["x"]))
        await asyncio.to_thread(held.entered.wait, 30)
        await b.stop()
        with pytest.raises(NotServing):
            await running
        held.gate.set()

    run(main())


def test_cancelled_requests_leave_the_queue_and_never_run():
    fn = Recorder()

    async def main():
        b = await _started(fn, max_batch=1)
        fn.gate.clear()
        first = asyncio.ensure_future(b.run(["first"]))
        await asyncio.to_thread(fn.entered.wait, 30)
        gone = asyncio.ensure_future(b.run(["gone-1", "gone-2"]))  # two jobs of max_batch 1
        await eventually(lambda: b.depth == 2)
        gone.cancel()  # what the router does when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await gone
        await asyncio.sleep(0)
        assert b.depth == 0
        fn.gate.set()
        assert await first == [("done", "first")]
        assert await b.run(["after"]) == [("done", "after")]
        await b.stop()
        seen = [it for batch in fn.batches for it in batch]
        assert "gone-1" not in seen and "gone-2" not in seen

    run(main())


def test_exceptions_fail_only_their_batch_and_limits_are_enforced():
    fn = Recorder()

    async def main():
        b = await _started(fn, max_batch=2, queue_limit=3)
        with pytest.raises(BackendFailed):
            await b.run(["boom"])
        assert await b.run(["ok"]) == [("done", "ok")]
        with pytest.raises(TooLarge):  # can never fit: more items than the queue holds
            await b.run(["a", "b", "c", "d"])
        fn.gate.clear()
        running = asyncio.ensure_future(b.run(["r"]))
        await asyncio.to_thread(fn.entered.wait, 30)
        queued = asyncio.ensure_future(b.run(["q1", "q2", "q3"]))
        await eventually(lambda: b.depth == 3)
        with pytest.raises(Overloaded):
            await b.run(["one too many"])
        fn.gate.set()
        await running
        assert await queued == [("done", "q1"), ("done", "q2"), ("done", "q3")]
        await b.stop()

    run(main())


@pytest.fixture(scope="module")
def backend(tiny_bundle):
    return OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1))


class HeldSampler:
    """The real backend, except that its first ``sample`` call waits at a gate."""

    def __init__(self, inner):
        self.inner = inner
        self.gate, self.entered = threading.Event(), threading.Event()
        self.held = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def warmup(self):
        self.inner.warmup()

    def sample(self, *args):
        if not self.held:
            self.held = True
            self.entered.set()
            self.gate.wait(30)
        return self.inner.sample(*args)


def test_concurrent_samples_share_one_loop_whatever_the_streams(tiny_bundle, backend):
    held = HeldSampler(backend)

    async def main():
        async with serving(tiny_bundle, held, streams=2, max_delay_ms=0) as (app, c):
            first = asyncio.ensure_future(c.post("/v1/sample", json={"n": 1, "seed": 1}))
            await asyncio.to_thread(held.entered.wait, 30)
            later = [asyncio.ensure_future(c.post("/v1/sample", json={"n": 2, "seed": s})) for s in (2, 3)]
            # With a second stream free they would start at once; they wait for the running loop instead.
            await eventually(lambda: app.state.vqtok.default.engine.sampler.depth == 4)
            held.gate.set()
            assert all(r.status_code == 200 for r in await asyncio.gather(first, *later))
            metrics = (await c.get("/metrics")).text
            assert metric_value(metrics, "vqtok_batch_size_count", op="sample") == 2  # 1, then 2 + 2 together
            assert metric_value(metrics, "vqtok_batch_size_sum", op="sample") == 5

    run(main())


def test_32_concurrent_encodes_batch_and_match_unbatched(tiny_bundle, backend):
    images = random_images(32, seed=5)
    blobs = [png_bytes(im) for im in images]

    async def main():
        async with serving(tiny_bundle, backend, max_batch=32, max_delay_ms=20) as (_, c):
            alone = []
            for blob in blobs:  # one at a time: every batch has one item
                r = await c.post("/v1/encode", files=image_files([blob]))
                alone.append(r.json()["items"][0])
            metrics = (await c.get("/metrics")).text
            assert metric_value(metrics, "vqtok_batch_size_count", op="encode") == 32
            assert metric_value(metrics, "vqtok_batch_size_bucket", op="encode", le="1.0") == 32

            responses = await asyncio.gather(*(c.post("/v1/encode", files=image_files([b])) for b in blobs))
            assert all(r.status_code == 200 for r in responses)
            assert [r.json()["items"][0] for r in responses] == alone

            metrics = (await c.get("/metrics")).text
            batches = metric_value(metrics, "vqtok_batch_size_count", op="encode") - 32
            assert metric_value(metrics, "vqtok_batch_size_sum", op="encode") == 64
            assert 1 <= batches < 32  # 32 images in fewer than 32 batches: some batch held several
            assert metric_value(metrics, "vqtok_queue_depth", op="encode") == 0

    run(main())


def test_mixed_shapes_batch_separately(tiny_bundle, backend):
    rng = np.random.default_rng(0)
    shapes = [(32, 32), (32, 48), (48, 32), (32, 32), (32, 48), (16, 16)] * 3
    blobs = [png_bytes(rng.integers(0, 255, (*s, 3), dtype=np.uint8)) for s in shapes]

    async def main():
        async with serving(tiny_bundle, backend, max_delay_ms=20) as (_, c):
            alone = [(await c.post("/v1/encode", params={"fit": "none"}, files=image_files([b]))).json()
                     for b in blobs]
            together = await asyncio.gather(*(c.post("/v1/encode", params={"fit": "none"}, files=image_files([b]))
                                              for b in blobs))
            assert [r.json() for r in together] == alone
            # One request with several shapes is split by shape and put back in order.
            r = await c.post("/v1/encode", params={"fit": "none"}, files=image_files(blobs[:6]))
            assert r.json()["items"] == [a["items"][0] for a in alone[:6]]
            assert [(it["height"], it["width"]) for it in r.json()["items"]] == shapes[:6]

    run(main())
