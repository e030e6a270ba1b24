"""An unload hands memory back only if nothing holds the unloaded version any more when it trims the heap
(``release_memory``); bench/reload.py measures it (issue 18, "memory comes back after an unload")."""
from __future__ import annotations

import concurrent.futures.thread as cft
import gc
import threading
import time
import weakref

from service_support import run

from service.engine.batcher import Batcher, BatcherConfig


class Owner:
    """Stands for an engine: its batch function is a bound method, so it holds the backend's sessions."""

    def batch(self, items: list[int]) -> list[int]:
        return items


def test_stop_waits_until_the_worker_threads_let_go_of_the_batch_function(monkeypatch):
    # A worker thread holds its last call (fn and its owner) from handing the result over until it comes round
    # its loop. On a busy machine that was after the request had been answered and the unload had trimmed the
    # heap: the sessions were freed afterwards and glibc kept their pages (RSS 473 -> 461 MB after an unload).
    original = cft._WorkItem.run

    def descheduled(self):
        original(self)
        if threading.current_thread().name.startswith("vqtok-"):
            time.sleep(0.3)  # the thread is not scheduled for a while after the result went out

    monkeypatch.setattr(cft._WorkItem, "run", descheduled)

    async def main() -> weakref.ref:
        owner = Owner()
        held = weakref.ref(owner)
        b = Batcher("encode", owner.batch, lambda item: 0, BatcherConfig(max_batch=4, max_delay_s=0.0, streams=2))
        b.start()
        assert await b.run([1, 2, 3]) == [1, 2, 3]
        del owner
        await b.stop()
        del b
        return held

    held = run(main())
    gc.collect()  # a cycle is not the question: only a live thread's frame can still hold it
    assert held() is None

