"""Hostile load, authentication (issue 10, items 10-12): with keys set, every path outside an explicit
open list needs one, under any mount point or root_path; empty keys are refused at start-up; a
setting puts /metrics behind the key."""
from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError
from service_support import run, serving
from starlette.applications import Starlette
from starlette.routing import Mount

from service.api.config import Settings
from service.api.server import serve
from service.bundle import Bundle
from service.runtime.backend import OrtBackend
from service.runtime.session import RuntimeConfig

KEY = {"Authorization": "Bearer k1"}


@pytest.fixture(scope="module")
def backend(tiny_bundle):
    return OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1))


def _client(app, root_path: str = "") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, root_path=root_path), base_url="http://test")


def test_every_path_outside_the_open_list_needs_the_key(tiny_bundle, backend):
    async def main():
        async with serving(tiny_bundle, backend, api_keys=["k1"]) as (app, c):
            # Unknown, oddly spelt and trailing-slash paths are refused before routing, not 404/405.
            for path in ["/v1/sample", "/v1/sample/", "/V1/sample", "//v1/sample", "/v1//sample", "/nope",
                         "/v2/encode", "/healthz/", "/metrics/x"]:
                r = await c.post(path, json={"n": 1})
                assert r.status_code == 401, (path, r.status_code)
            for path in ["/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/demo"]:
                assert (await c.get(path)).status_code == 200, path
            # A bare "Bearer" (no key) and an empty one never match.
            for value in ["Bearer", "Bearer ", "Bearer  ", "Basic k1", "k1"]:
                r = await c.post("/v1/sample", json={"n": 1}, headers={"Authorization": value})
                assert r.status_code == 401, value
            assert (await c.post("/v1/sample", json={"n": 1}, headers=KEY)).status_code == 200

            # Behind a root_path (a proxy prefix), the same app, the same rules.
            async with _client(app, root_path="/x") as rc:
                for path in ["/x/v1/sample", "/x/x/v1/sample", "/v1/sample"]:
                    assert (await rc.post(path, json={"n": 1})).status_code == 401, path
                assert (await rc.get("/x/healthz")).status_code == 200
                assert (await rc.post("/x/v1/sample", json={"n": 1}, headers=KEY)).status_code == 200

            # Mounted inside another application under a prefix.
            outer = Starlette(routes=[Mount("/api", app=app)])
            async with _client(outer) as oc:
                assert (await oc.post("/api/v1/sample", json={"n": 1})).status_code == 401
                assert (await oc.get("/api/healthz")).status_code == 200
                assert (await oc.post("/api/v1/sample", json={"n": 1}, headers=KEY)).status_code == 200

    run(main())


@pytest.mark.parametrize("keys", ['["k",""]', '["k", "  "]', "k,,j", "k, ,j", '[""]'])
def test_empty_keys_are_refused_at_start_up(keys, monkeypatch, capsys):
    monkeypatch.setenv("VQTOK_API_KEYS", keys)
    with pytest.raises(ValidationError, match="empty or only whitespace"):
        Settings()
    assert serve() == 2
    assert "VQTOK_API_KEYS" in capsys.readouterr().err


def test_no_keys_means_open_and_a_plain_list_works(monkeypatch):
    monkeypatch.setenv("VQTOK_API_KEYS", "")
    assert Settings().api_keys == []
    monkeypatch.setenv("VQTOK_API_KEYS", " a, b ")
    assert Settings().api_keys == ["a", "b"]


def test_a_setting_puts_metrics_behind_the_key(tiny_bundle, backend):
    async def main():
        async with serving(tiny_bundle, backend, api_keys=["k1"], metrics_auth=True) as (_, c):
            r = await c.get("/metrics")
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert (await c.get("/metrics", headers=KEY)).status_code == 200
            assert (await c.get("/healthz")).status_code == 200
            spec = (await c.get("/openapi.json")).json()
            assert spec["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]
            assert "security" not in spec["paths"]["/healthz"]["get"]

    run(main())
