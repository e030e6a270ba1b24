"""Hostile load, batching (issue 10, items 6-9): a request value never fails its batch-mates, shapes
are served in arrival order, stuck or dead batchers turn /readyz 503, and a sampling loop stops once
nobody waits for it."""
from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import pytest
from service_support import eventually, metric_value, run, serving
from test_service_batching import Recorder
from test_service_errors import GOOD, Flaky

from service.api.config import Settings
from service.bundle import Bundle
from service.engine.batcher import Batcher, BatcherConfig, _Job
from service.runtime import sampler as sampler_module
from service.runtime.backend import OrtBackend
from service.runtime.session import RuntimeConfig


@pytest.fixture(scope="module")
def backend(tiny_bundle):
    return OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1))


def test_a_bad_sample_value_never_joins_a_batch(tiny_bundle, backend):
    async def main():
        # A long delay puts every request that arrives together into one batch.
        async with serving(tiny_bundle, backend, max_delay_ms=200) as (_, c):
            before = metric_value((await c.get("/metrics")).text, "vqtok_batch_failures_total", op="sample")
            hostile = [{"n": 1, "top_k": 1e20}, {"n": 1, "top_k": 33}, {"n": 1, "temperature": 1e-40},
                       {"n": 1, "temperature": 1e39}, {"n": 1, "seed": 2**63}]
            answers = await asyncio.gather(*(c.post("/v1/sample", json=body) for body in [{"n": 1}, *hostile]))
            assert answers[0].status_code == 200, answers[0].text
            for body, r in zip(hostile, answers[1:]):
                assert r.status_code == 422, (body, r.text)
                assert next(iter(set(body) - {"n"})) in r.json()["error"]["message"]
            assert "1..32" in answers[2].json()["error"]["message"]  # K of the tiny bundle
            ok = await c.post("/v1/sample", json={"n": 1, "top_k": 32, "temperature": 1e-30})
            assert ok.status_code == 200
            after = metric_value((await c.get("/metrics")).text, "vqtok_batch_failures_total", op="sample")
            assert after == before

    run(main())


def test_an_older_job_of_another_shape_is_not_starved():
    fn = Recorder()

    async def main():
        b = Batcher("fair", fn, lambda item: item[0], BatcherConfig(max_batch=2, max_delay_s=0.02, streams=1))
        b.start()
        fn.gate.clear()
        first = asyncio.ensure_future(b.run([("a", -1), ("a", -2)]))
        await asyncio.to_thread(fn.entered.wait, 30)
        # While a batch runs: one job of shape b, then a steady supply of full batches of shape a.
        lonely = asyncio.ensure_future(b.run([("b", 0)]))
        await asyncio.sleep(0.05)  # b is now due (older than max_delay)
        flood = [asyncio.ensure_future(b.run([("a", i), ("a", i)])) for i in range(6)]
        await eventually(lambda: b.depth == 13)
        fn.gate.set()
        await asyncio.gather(first, lonely, *flood)
        await b.stop()
        order = [batch[0][0] for batch in fn.batches]
        # b arrived before every waiting a: it runs right after the batch that was running.
        assert order[1] == "b", order

    run(main())


def test_jobs_cancelled_while_a_batch_formed_are_left_out():
    fn = Recorder()

    async def main():
        b = Batcher("skip", fn, lambda item: 0, BatcherConfig(max_batch=4, max_delay_s=0.0))
        b.start()
        loop = asyncio.get_running_loop()
        kept, gone = _Job(0, ["kept"], loop.create_future()), _Job(0, ["gone"], loop.create_future())
        gone.future.cancel()
        await b._execute([kept, gone])
        assert fn.batches == [["kept"]] and kept.future.result() == [("done", "kept")]
        await b.stop()

    run(main())


def test_a_stuck_batch_and_a_dead_batcher_turn_readyz_503(tiny_bundle, backend, caplog):
    flaky = Flaky(backend)

    async def main():
        async with serving(tiny_bundle, flaky, batch_watchdog_s=0.3, request_timeout_s=30) as (app, c):
            assert (await c.get("/readyz")).status_code == 200
            flaky.gate.clear()
            flaky.entered.clear()
            stuck = asyncio.ensure_future(c.post("/v1/encode", files=[("images", ("a.png", GOOD, "image/png"))]))
            await asyncio.to_thread(flaky.entered.wait, 30)
            await asyncio.sleep(0.4)
            r = await c.get("/readyz")
            assert r.status_code == 503 and r.json()["error"]["code"] == "unhealthy"
            assert "encode batch" in r.json()["error"]["message"]
            flaky.gate.set()
            assert (await stuck).status_code == 200
            assert (await c.get("/readyz")).status_code == 200

            # The decode batcher's task dies of an unexpected error.
            decoder = app.state.vqtok.default.engine.decoder

            def broken(now):
                raise RuntimeError("batcher bug")

            decoder._ready_key = broken
            decoder._wakeup.set()
            await eventually(lambda: decoder._task.done())
            r = await c.get("/readyz")
            assert r.status_code == 503 and "decode batcher has stopped" in r.json()["error"]["message"]

    with caplog.at_level(logging.ERROR, logger="vqtok.service"):
        run(main())
    logged = caplog.text
    assert "encode batch has been running" in logged and "decode batcher task ended unexpectedly" in logged


def test_graceful_shutdown_covers_the_request_timeout():
    assert Settings(request_timeout_s=60).graceful_s >= 60
    assert Settings(request_timeout_s=60, graceful_timeout_s=10).graceful_s == 10  # an explicit choice wins


class CountingPicks:
    """Wraps ``pick_codes``: counts the codes picked, slowly, so a sample outlives its deadline."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay, self.calls = inner, delay, 0
        self.lock = threading.Lock()

    def __call__(self, *args):
        with self.lock:
            self.calls += 1
        threading.Event().wait(self.delay)
        return self.inner(*args)


@pytest.mark.parametrize("method", ["cached", "naive"])
def test_a_sample_nobody_waits_for_stops_at_the_next_row(tiny_bundle, monkeypatch, method):
    backend = OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1, sampler=method))
    picks = CountingPicks(sampler_module.pick_codes, delay=0.02)
    monkeypatch.setattr(sampler_module, "pick_codes", picks)
    # The tiny bundle: 4x4 top and 8x8 bottom codes, 80 picks a sample at 20 ms each (1.6 s).
    full = 4 * 4 + 8 * 8

    async def main():
        async with serving(tiny_bundle, backend, request_timeout_s=0.3) as (app, c):
            picks.calls = 0
            r = await c.post("/v1/sample", json={"n": 1, "seed": 1})
            assert r.status_code == 504
            stopped_at = picks.calls
            await eventually(lambda: app.state.vqtok.default.engine.sampler._running == {})
            # The loop stopped within a row (8 picks) of the deadline, not after all 80.
            assert picks.calls <= stopped_at + 8 < full, (picks.calls, stopped_at)
            metrics = (await c.get("/metrics")).text
            assert metric_value(metrics, "vqtok_batch_failures_total", op="sample") == 0
        if method == "naive":
            engine_cfg = app.state.vqtok.default.engine.sampler.config
            assert engine_cfg.max_batch == Settings().naive_sample_max_batch

    run(main())
    monkeypatch.undo()
    # The hook is reset after its batch: the same sampler samples normally again.
    codes = backend.sample(*_sample_inputs(backend))
    assert codes[backend.levels[0]].shape == (1, 4, 4)


def _sample_inputs(backend):
    from service.bundle.sampling import noise_for

    return noise_for(backend.bundle, 0, 1), np.ones(1, np.float32), np.zeros(1, np.int64)
