"""The engine process of the workers layout: it owns the ONNX Runtime sessions and batches the
requests of every front-end worker together.

The front ends (``service.api.workers``, each with a ``service.engine.remote.RemoteEngine``) do
HTTP, validation, image decoding and answer encoding; they send the engine a small JSON header per
request over a Unix socket, while the tensors lie in the worker's shared-memory slab
(``service.engine.shm``). The engine runs the same ``Engine`` (batchers)
as the one-process server, so batching, streams, queue limits and deadlines mean the same here.

Messages, worker to engine (each with an ``id``):
    hello   {"slab": name}                      first message; answered by {"event": "ready"} once warm
    encode  {"in": [image specs], "out": [code specs, item-major, levels in manifest order]}
    decode  {"in": [code specs, item-major], "out": [image specs]}
    sample  {"items": [[seed, n, index, temperature, top_k]], "out": [[image, *codes] specs]}
    bits    {"in": [code specs]}                answered with {"bits": [...]}
    cancel  {"ref": id}                         the worker gave up waiting (its client left)
    metrics {}                                  answered with {"text": Prometheus exposition}
with ``seg`` naming a segment of its own when the request did not fit the slab, and ``t`` the
seconds left until the request's deadline. Every request gets exactly one answer, ``{"id", "ok"}`` or
``{"id", "error": {...}}`` (an engine error by class name, ``service.engine.errors.to_wire``), and
only after the engine is done with its region.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from service.bundle import Bundle
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.errors import BackendFailed, Cancelled, EngineError, InvalidRequest, to_wire
from service.engine.metrics import Metrics
from service.engine.protocol import SampleItem
from service.engine.shm import Slab, frame, read_frame
from service.runtime.backend import OrtBackend
from service.runtime.session import RuntimeConfig

log = logging.getLogger("vqtok.engine")


def engine_info(backend: OrtBackend) -> dict[str, Any]:
    """What the front ends need to know of the backend they never see."""
    return {"provider": backend.provider, "gpu_name": backend.gpu_name, "can_sample": backend.can_sample,
            "sampler": backend.sampler_method}


@dataclass(frozen=True)
class EngineSetup:
    """Everything the engine process needs, sent to it at spawn (plain dataclasses pickle)."""

    model_dir: str
    runtime: RuntimeConfig
    engine: EngineConfig
    log_level: str = "info"


class EngineServer:
    def __init__(self, backend: OrtBackend, config: EngineConfig):
        self.backend, self.config = backend, config
        self.levels = backend.bundle.level_names
        self.metrics = Metrics()
        self.metrics.watch_backend(backend)
        self.engine: Engine | None = None
        self.ready = asyncio.Event()
        self.listening = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    async def serve(self, path: str | Path, stop: asyncio.Event) -> None:
        self.engine = Engine(self.backend, self.config, self.metrics)
        self.engine.start()
        server = await asyncio.start_unix_server(self._connection, path=str(path))
        self.listening.set()
        warm = asyncio.create_task(self._warm_up())
        try:
            await stop.wait()
        finally:
            warm.cancel()
            server.close()
            for writer in list(self._writers):
                writer.close()
            await self.engine.stop()

    async def _warm_up(self) -> None:
        await asyncio.to_thread(self.backend.warmup)
        self.ready.set()
        log.info("engine warm-up done")
        for writer in list(self._writers):
            writer.write(frame({"event": "ready"}))

    # -- one connection per front-end worker (plus short ones for metrics) ----------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        slab: Slab | None = None
        tasks: dict[int, asyncio.Task] = {}
        try:
            while True:
                try:
                    msg = await read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                op = msg.get("op")
                if op == "hello":
                    slab = Slab.open(msg["slab"])
                    self._writers.add(writer)
                    if self.ready.is_set():
                        writer.write(frame({"event": "ready"}))
                elif op == "metrics":
                    writer.write(frame({"id": msg["id"], "text": generate_latest(self.metrics.registry).decode()}))
                elif op == "cancel":
                    task = tasks.get(msg["ref"])
                    if task is not None:
                        task.cancel()
                else:
                    task = asyncio.create_task(self._request(msg, slab, writer))
                    tasks[msg["id"]] = task
                    task.add_done_callback(lambda _, i=msg["id"]: tasks.pop(i, None))
        finally:
            self._writers.discard(writer)
            for task in list(tasks.values()):
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            writer.close()
            if slab is not None:
                slab.close()

    async def _request(self, msg: dict, slab: Slab | None, writer: asyncio.StreamWriter) -> None:
        seg = Slab.open(msg["seg"]) if msg.get("seg") else slab
        try:
            reply = await self._run(msg, seg)
        except asyncio.CancelledError:
            reply = {"error": to_wire(Cancelled("cancelled"))}
        except EngineError as e:
            reply = {"error": to_wire(e)}
        except Exception as e:  # one request's failure must not end the connection
            log.exception("engine request %s failed", msg.get("op"))
            reply = {"error": to_wire(BackendFailed(f"{msg.get('op')} failed ({type(e).__name__})"))}
        finally:
            if seg is not slab and seg is not None:
                seg.close()
        reply["id"] = msg["id"]
        if not writer.is_closing():
            writer.write(frame(reply))

    async def _run(self, msg: dict, seg: Slab) -> dict:
        engine, levels = self.engine, self.levels
        deadline = asyncio.get_running_loop().time() + msg["t"]
        op = msg["op"]
        if op == "encode":
            images = [seg.view(spec) for spec in msg["in"]]
            out = iter(msg["out"])
            for codes in await engine.encode(images, deadline):
                for name in levels:
                    seg.view(next(out))[...] = codes[name]
        elif op == "decode":
            specs = iter(msg["in"])
            items = [{name: seg.view(next(specs)) for name in levels} for _ in range(len(msg["in"]) // len(levels))]
            for spec, image in zip(msg["out"], await engine.decode(items, deadline)):
                seg.view(spec)[...] = image
        elif op == "sample":
            items = [SampleItem(int(s), int(n), int(i), float(t), int(k)) for s, n, i, t, k in msg["items"]]
            for specs, (image, codes) in zip(msg["out"], await engine.sample(items, deadline)):
                seg.view(specs[0])[...] = image
                for spec, name in zip(specs[1:], levels):
                    seg.view(spec)[...] = codes[name]
        elif op == "bits":
            specs = iter(msg["in"])
            items = [{name: seg.view(next(specs)) for name in levels} for _ in range(len(msg["in"]) // len(levels))]
            return {"bits": await engine.code_bits(items, deadline)}
        else:
            raise InvalidRequest(f"unknown engine operation {op!r}")
        return {"ok": True}


def run_engine(setup: EngineSetup, path: str, status: Connection) -> None:
    """The engine process's main: load, report ("loaded", info) or ("error", message), then serve."""
    logging.basicConfig(level=setup.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        backend = OrtBackend(Bundle.load(setup.model_dir, verify=False), setup.runtime)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which exits with it
        status.send(("error", str(e)))
        return
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Only the parent ends the engine, after the front ends have drained: by a word on the status
        # pipe, or by dying (the pipe closes). Signals to the whole process group (Ctrl-C, a
        # container's stop) must not stop it while the front ends still answer their requests.
        loop.add_signal_handler(signal.SIGTERM, lambda: None)
        loop.add_signal_handler(signal.SIGINT, lambda: None)

        def parent_said() -> None:
            try:
                status.recv()
            except (EOFError, OSError):
                pass
            loop.remove_reader(status.fileno())
            stop.set()

        loop.add_reader(status.fileno(), parent_said)
        server = EngineServer(backend, setup.engine)
        serving = asyncio.create_task(server.serve(path, stop))
        await server.listening.wait()
        status.send(("loaded", engine_info(backend)))
        await serving

    asyncio.run(main())
