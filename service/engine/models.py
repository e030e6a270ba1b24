"""The bundles one server holds: several at once, each version with its own backend and engine,
loaded and unloaded while requests run.

A code grid means nothing without the bundle that made it, so every loaded bundle has a **version
id**: a short prefix of its manifest's sha256 (the manifest holds every graph's digest), unique among
the loaded bundles. Answers that hold codes carry it, and codes tagged with another version are
refused (``VersionMismatch``) instead of decoding into the wrong pictures.

Names: a bundle is served under a name (its manifest's name, or one given at load). Several versions
of one name may be loaded at once during a swap; ``name`` means its newest ready version,
``name@id`` one version exactly, and no name the first name loaded (the default).

Lifecycle of a version: ``load`` verifies it (checksums, the export's recorded parity, every file),
opens its sessions, starts its engine and warms it up, and only then lists it. ``unload`` takes it
off the list at once (new requests can no longer pick it), waits for the requests already holding it
(``lease``) to finish, then stops its engine and lets its sessions go.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.bundle import ID_CHARS, Bundle
from service.engine.errors import EngineError, InvalidRequest
from service.engine.protocol import InferenceEngine
from service.runtime.backend import Backend
from service.runtime.parity import recorded_problem
from service.runtime.session import CUDA

log = logging.getLogger("vqtok.service")


class ModelNotFound(EngineError):
    code = "model_not_found"


class VersionMismatch(EngineError):
    """Codes made by one version, sent to another."""

    code = "version_mismatch"


class BadBundle(InvalidRequest):
    """A bundle refused at load: a checksum, the parity record or a file is wrong."""

    code = "bad_bundle"


@dataclass(eq=False)
class LoadedModel:
    name: str
    version: str
    bundle: Bundle
    backend: Backend
    engine: InferenceEngine
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    info: dict[str, Any] = field(default_factory=dict)  # GET /v1/model's body, filled by the API
    in_flight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def lease(self) -> Lease:
        """Held by a request from when it picks this version until it has been answered."""
        self.in_flight += 1
        self._idle.clear()
        return Lease(self)

    async def drained(self) -> None:
        if self.in_flight:
            await self._idle.wait()

    def describe(self) -> dict[str, Any]:
        """The bundle's manifest summary and where it runs (GET /v1/model adds the server's limits)."""
        m, backend = self.bundle.manifest, self.backend
        return {"name": self.name, "version": self.version,
                "sha256": self.bundle.sha256,  # the model's identity: folder jobs record it in their shards
                "format_version": m["format_version"], "image_size": self.bundle.image_size, "levels": m["levels"],
                "graphs": sorted(m["files"]), "provider": backend.provider,
                "device": "cuda" if backend.provider == CUDA else "cpu", "gpu": getattr(backend, "gpu_name", None),
                "sampler": backend.sampler_method, "streams": self.engine.streams, "parity": m.get("parity", {}),
                "metrics": m.get("metrics", {}), "onnx": m.get("onnx", {})}

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "ref": self.ref, "sha256": self.bundle.sha256,
                "levels": [lv.name for lv in self.bundle.levels.values()], "image_size": self.bundle.image_size,
                "can_sample": self.engine.can_sample, "ready": self.ready.is_set()}


class Lease:
    """Released once, however the request ends (it rides with the request's pixel tickets)."""

    def __init__(self, model: LoadedModel):
        self.model: LoadedModel | None = model

    def release(self) -> None:
        m, self.model = self.model, None
        if m is not None:
            m.in_flight -= 1
            if m.in_flight == 0:
                m._idle.set()


class Models:
    """The loaded versions, in load order. Event-loop-only: every method runs on the server's loop."""

    def __init__(self) -> None:
        self._loaded: list[LoadedModel] = []
        self._loading: set[str] = set()  # sha256 of bundles being loaded (a second load of one is refused)

    def __iter__(self):
        return iter(list(self._loaded))

    def __len__(self) -> int:
        return len(self._loaded)

    @property
    def default_name(self) -> str | None:
        return self._loaded[0].name if self._loaded else None

    def versions(self) -> list[str]:
        return [m.ref for m in self._loaded]

    def resolve(self, spec: str | None = None, version: str | None = None) -> LoadedModel:
        """The version a request runs on. ``spec``: None (the default name), ``name`` or ``name@id``;
        ``version``: the version id its codes carry, if any (untagged codes go where ``spec`` says)."""
        if spec is None and version is not None:
            tagged = self._by_version(version)
            if tagged is None:
                raise VersionMismatch(f"these codes were made by version {version}, which is not loaded; "
                                      f"loaded: {', '.join(self.versions())}")
            return tagged
        name, _, want = (spec or self.default_name or "").partition("@")
        if want:
            found = self._by_version(want)
            if found is None or found.name != name:
                raise ModelNotFound(f"no loaded model {spec!r}; loaded: {', '.join(self.versions()) or 'none'}")
        else:
            candidates = [m for m in self._loaded if m.name == name]
            if not candidates:
                raise ModelNotFound(f"no loaded model {name!r}; loaded: {', '.join(self.versions()) or 'none'}")
            found = candidates[-1]  # the newest version of the name (only warm versions are listed)
        if version is not None and not found.version.startswith(version) and not version.startswith(found.version):
            raise VersionMismatch(f"these codes were made by version {version}, not by {found.ref} which this "
                                  f"request names; loaded: {', '.join(self.versions())}")
        return found

    def _by_version(self, version: str) -> LoadedModel | None:
        # A tag may be longer than today's id (ids grow when prefixes collide), never shorter than ID_CHARS.
        return next((m for m in self._loaded if version.startswith(m.version) or
                     (len(version) >= ID_CHARS and m.version.startswith(version))), None)

    async def load(self, name: str | None, bundle: Bundle, open_backend: Callable[[Bundle], Backend],
                   make_engine: Callable[[Backend, str], InferenceEngine], describe: Callable[[LoadedModel], dict]
                   ) -> LoadedModel:
        """Open, start and warm a new version, then list it. Raises ``BadBundle``; the loaded ones are untouched.

        ``make_engine(backend, "name@id")`` builds its engine (the ref labels its metrics)."""
        sha = bundle.sha256
        name = name or bundle.name
        if sha in self._loading or any(m.bundle.sha256 == sha for m in self._loaded):
            raise BadBundle(f"this bundle ({sha[:ID_CHARS]}) is loaded already")
        problem = recorded_problem(bundle.manifest.get("parity"))
        if problem:
            raise BadBundle(f"bundle {bundle.root.name}: {problem}")
        self._loading.add(sha)
        engine = None
        try:
            backend = await asyncio.to_thread(open_backend, bundle)
            version = bundle.version_id({m.version for m in self._loaded})
            engine = make_engine(backend, f"{name}@{version}")
            engine.start()
            await asyncio.to_thread(backend.warmup)
            model = LoadedModel(name, version, bundle, backend, engine)
            model.info = describe(model)
            model.ready.set()
        except EngineError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to open or run its graphs refuses the bundle
            if engine is not None:
                await engine.stop()
            raise BadBundle(f"bundle {bundle.root.name} failed to load: {type(e).__name__}: {e}") from None
        finally:
            self._loading.discard(sha)
        self._loaded.append(model)
        log.info("loaded %s from %s", model.ref, bundle.root)
        return model

    async def unload(self, spec: str, timeout_s: float) -> LoadedModel:
        """Take ``name@id`` off the list now; stop it once its running requests have finished."""
        if "@" not in spec:
            raise InvalidRequest("unload names one version: name@id (GET /v1/models lists them)")
        model = self.resolve(spec)
        if len(self._loaded) == 1:
            raise InvalidRequest(f"{model.ref} is the only loaded model; load another one first")
        self._loaded.remove(model)
        try:
            async with asyncio.timeout(timeout_s):
                await model.drained()
        except TimeoutError:
            log.warning("unloading %s with %d requests still running after %g s", model.ref, model.in_flight,
                        timeout_s)
        await model.engine.stop()
        model.ready.clear()
        log.info("unloaded %s", model.ref)
        return model



def bundle_dirs(models: list[str], folder: str | Path | None) -> list[tuple[str | None, Path]]:
    """(name or None, directory) for ``--model [NAME=]DIR`` (repeated) and ``--models FOLDER`` (one bundle
    per subfolder, named after it), in that order."""
    out: list[tuple[str | None, Path]] = []
    for spec in models:
        name, sep, path = spec.partition("=")
        out.append((name, Path(path)) if sep and name and "/" not in name else (None, Path(spec)))
    if folder is not None:
        out += [(d.name, d) for d in sorted(Path(folder).iterdir()) if (d / "manifest.json").is_file()]
    return out
