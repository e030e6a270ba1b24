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


def engine_info(backends: dict[str, OrtBackend]) -> dict[str, dict[str, Any]]:
    """What the front ends need to know of the backends they never see, by bundle (manifest sha256)."""
    return {sha: {"provider": b.provider, "gpu_name": b.gpu_name, "can_sample": b.can_sample,
                  "sampler": b.sampler_method} for sha, b in backends.items()}


@dataclass(frozen=True)
class EngineSetup:
    """Everything the engine process needs, sent to it at spawn (plain dataclasses pickle)."""

    model_dirs: list[str]  # every bundle the server starts with, in order
    runtime: RuntimeConfig
    engine: EngineConfig
    log_level: str = "info"


class EngineServer:
    """One ``Engine`` per bundle; requests name theirs by its manifest's sha256 (``model``)."""

    def __init__(self, backends: dict[str, OrtBackend], config: EngineConfig):
        self.backends, self.config = backends, config
        self.metrics = Metrics()
        self.engines: dict[str, Engine] = {}
        self.ready = asyncio.Event()
        self.listening = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    async def serve(self, path: str | Path, stop: asyncio.Event) -> None:
        for sha, backend in self.backends.items():
            self.metrics.watch_backend(backend, f"{backend.bundle.name}@{sha[:12]}")
            self.engines[sha] = Engine(backend, self.config, self.metrics, f"{backend.bundle.name}@{sha[:12]}")
            self.engines[sha].start()
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
            for engine in self.engines.values():
                await engine.stop()

    async def _warm_up(self) -> None:
        for backend in self.backends.values():
            await asyncio.to_thread(backend.warmup)
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
        engine = self.engines.get(msg.get("model", ""))
        if engine is None:
            raise InvalidRequest(f"the engine holds no bundle {msg.get('model')!r}")
        levels = engine.levels
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
        backends = {}
        for d in setup.model_dirs:
            bundle = Bundle.load(d, verify=False)
            backends[bundle.sha256] = OrtBackend(bundle, setup.runtime)
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
        server = EngineServer(backends, setup.engine)
        serving = asyncio.create_task(server.serve(path, stop))
        await server.listening.wait()
        status.send(("loaded", engine_info(backends)))
        await serving

    asyncio.run(main())


class EngineStartFailed(RuntimeError):
    """The engine process could not load its bundles or device (the message says why)."""


class EngineProcess:
    """The engine process seen from the parent: started, waited on until its sessions are open, stopped."""

    def __init__(self, setup: EngineSetup, socket_path: str):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._status, child_end = ctx.Pipe()  # the engine reports on it; the parent says "stop" on it
        self.process = ctx.Process(target=run_engine, args=(setup, socket_path, child_end), name="vqtok-engine")
        self.process.start()
        child_end.close()

    def wait_loaded(self) -> dict[str, dict[str, Any]]:
        """The engine's info on every bundle (``engine_info``); raises ``EngineStartFailed``."""
        while not self._status.poll(0.5):
            if not self.process.is_alive():
                raise EngineStartFailed(f"the engine process exited with {self.process.exitcode}")
        kind, payload = self._status.recv()
        if kind == "error":
            self.process.join(10)
            raise EngineStartFailed(payload)
        return payload

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self._status.send("stop")
            except OSError:  # it is exiting anyway
                pass
            self.process.join(30)
            if self.process.is_alive():
                self.process.kill()
        self._status.close()
