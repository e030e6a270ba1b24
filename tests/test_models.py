"""Several bundles in one server (issue 18): every answer's codes carry their bundle's version id,
codes never decode on another bundle (409), unknown models are 404, and bundles load and unload at run
time behind the admin key without failing the requests already running."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil

import numpy as np
import pytest
from conftest import export_tiny_bundle, random_images
from PIL import Image
from service_support import image_files, png_bytes, run, serve_process, serving

from service.bundle import Bundle
from service.client import AsyncClient, Codes, VersionMismatchError

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def bundle_b(tmp_path_factory):
    """A second tiny bundle: other weights, so the same codes decode to other pixels."""
    return export_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny-b", seed=1)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_two_bundles_in_one_server(tiny_bundle, bundle_b):
    a_id, b_id = Bundle.load(tiny_bundle).version_id(), Bundle.load(bundle_b).version_id()
    blob = png_bytes(random_images(1, seed=7)[0])

    async def main():
        async with serving(tiny_bundle, extra_models=[f"b={bundle_b}"]) as (_, c):
            listed = (await c.get("/v1/models")).json()
            assert listed["default"] == "tiny"
            assert [(m["name"], m["version"], m["ready"]) for m in listed["models"]] == [("tiny", a_id, True),
                                                                                      ("b", b_id, True)]
            assert listed["models"][0]["levels"] == ["top", "bottom"] and listed["models"][1]["image_size"] == 32

            enc = (await c.post("/v1/encode", files=image_files([blob]))).json()  # no model: the default, A
            assert enc["model"] == "tiny" and enc["version"] == a_id and enc["items"][0]["version"] == a_id
            item = {k: enc["items"][0][k] for k in ("top", "bottom", "version")}
            untagged = {k: item[k] for k in ("top", "bottom")}

            # A's tagged codes decode on A, named or not.
            on_a = (await c.post("/v1/decode", json={"items": [item]})).json()
            assert on_a["version"] == a_id
            named_a = (await c.post("/v1/decode?model=tiny", json={"items": [item]})).json()
            assert named_a["images"] == on_a["images"]
            pinned = (await c.post(f"/v1/decode?model=tiny@{a_id}", json={"items": [item]})).json()
            assert pinned["images"] == on_a["images"]

            # A's tagged codes sent to B: 409, naming both versions and what is loaded.
            r = await c.post("/v1/decode?model=b", json={"items": [item]})
            assert r.status_code == 409, r.text
            err = r.json()["error"]
            assert err["code"] == "version_mismatch"
            assert a_id in err["message"] and b_id in err["message"] and f"tiny@{a_id}" in err["message"]

            # Untagged codes go where the request says: B's pixels differ from A's for the same codes.
            on_b = (await c.post("/v1/decode?model=b", json={"items": [untagged]})).json()
            assert on_b["version"] == b_id
            assert not np.array_equal(pixels(on_b["images"][0]), pixels(on_a["images"][0]))
            default = (await c.post("/v1/decode", json={"items": [untagged]})).json()
            assert default["version"] == a_id and default["images"] == on_a["images"]

            # The top-level tag works too, and contradicting tags are refused.
            top_level = (await c.post("/v1/decode", json={"items": [untagged], "version": a_id})).json()
            assert top_level["images"] == on_a["images"]
            r = await c.post("/v1/decode", json={"items": [item], "version": b_id})
            assert r.status_code == 422

            # Unknown names and versions: 404 with the loaded list.
            for spec in ("nope", f"b@{a_id}", "tiny@000000000000"):
                r = await c.post(f"/v1/encode?model={spec}", files=image_files([blob]))
                assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (spec, r.text)
            assert (await c.get("/v1/model?model=nope")).status_code == 404
            assert (await c.get("/v1/model?model=b")).json()["version"] == b_id

            # Samples carry the tag per item, and decode back on their bundle.
            s = (await c.post("/v1/sample?model=b", json={"n": 1, "seed": 2, "return_codes": True})).json()
            assert s["version"] == b_id and s["codes"][0]["version"] == b_id
            back = (await c.post("/v1/decode", json={"items": s["codes"]})).json()
            assert back["version"] == b_id and back["images"] == s["images"]

    run(main())


def test_the_client_keeps_the_version_with_the_codes(tiny_bundle, bundle_b):
    async def main():
        async with serving(tiny_bundle, extra_models=[f"b={bundle_b}"]) as (app, _):
            import httpx

            transport = httpx.ASGITransport(app=app)
            async with AsyncClient("http://test", transport=transport, model="b") as on_b, \
                    AsyncClient("http://test", transport=transport) as default:
                codes = (await on_b.encode(random_images(1, seed=3)[0]))[0]
                assert codes.version == Bundle.load(bundle_b).version_id()
                stored = json.loads(json.dumps(codes.to_wire()))  # what a caller would store
                assert stored["version"] == codes.version
                # The default client (bundle A) sends B's codes to B: the tag routes them, no model needed.
                assert len(await default.decode(codes)) == 1
                with pytest.raises(VersionMismatchError):
                    async with AsyncClient("http://test", transport=transport, model="tiny") as on_a:
                        await on_a.decode(codes)
                untagged = Codes({k: v for k, v in codes.items()})
                assert len(await on_a_decode(transport, untagged)) == 1
                assert [m["name"] for m in (await default.models())["models"]] == ["tiny", "b"]

    async def on_a_decode(transport, codes):
        async with AsyncClient("http://test", transport=transport, model="tiny") as on_a:
            return await on_a.decode(codes)

    run(main())


def test_load_and_unload_at_run_time(tiny_bundle, bundle_b, tmp_path):
    """A second version loads (warmed, then listed), the first unloads while its request finishes, a
    bad bundle is refused and the running ones are untouched, and only the admin key may do it."""
    bad = tmp_path / "bad"
    shutil.copytree(bundle_b, bad)
    with open(bad / "decoder.onnx", "r+b") as f:  # one flipped byte: its checksum no longer matches
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    b_id = Bundle.load(bundle_b).version_id()
    blob = png_bytes(random_images(1, seed=5)[0])

    async def main():
        async with serving(tiny_bundle, admin_key="admin-secret", api_keys=["user"]) as (app, c):
            user = {"Authorization": "Bearer user"}
            a_ref = (await c.get("/v1/models", headers=user)).json()["models"][0]["ref"]
            # The admin API takes only the admin key.
            for headers in ({}, user):
                r = await c.post("/admin/models", json={"path": str(bundle_b)}, headers=headers)
                assert r.status_code == 401, r.text
            r = await c.post("/admin/models", json={"path": str(bad)}, headers=ADMIN)
            assert r.status_code == 422 and r.json()["error"]["code"] == "bad_bundle", r.text
            r = await c.post("/admin/models", json={"path": str(tmp_path / "missing")}, headers=ADMIN)
            assert r.status_code == 422, r.text
            assert len((await c.get("/v1/models", headers=user)).json()["models"]) == 1

            r = await c.post("/admin/models", json={"path": str(bundle_b), "name": "tiny"}, headers=ADMIN)
            assert r.status_code == 201 and r.json()["version"] == b_id and r.json()["ready"], r.text
            # The name now means its newest version; the old one stays reachable by name@id.
            enc = (await c.post("/v1/encode", files=image_files([blob]), headers=user)).json()
            assert enc["version"] == b_id
            old = (await c.post(f"/v1/encode?model={a_ref}", files=image_files([blob]), headers=user)).json()
            assert old["items"][0]["version"] == a_ref.split("@")[1]

            # Unload the old version while one of its requests is running: the request finishes on it.
            model = app.state.vqtok.models.resolve(a_ref)
            lease = model.lease()  # a request in flight on the old version
            unloading = asyncio.create_task(c.delete(f"/admin/models/{a_ref}", headers=ADMIN))
            await asyncio.sleep(0.2)
            assert not unloading.done()  # waiting for that request
            assert [m["ref"] for m in (await c.get("/v1/models", headers=user)).json()["models"]] == [f"tiny@{b_id}"]
            r = await c.post(f"/v1/encode?model={a_ref}", files=image_files([blob]), headers=user)
            assert r.status_code == 404  # new requests can no longer pick it
            codes = await model.engine.encode([np.zeros((32, 32, 3), np.uint8)], None)  # still serving it
            assert set(codes[0]) == {"top", "bottom"}
            lease.release()
            r = await unloading
            assert r.status_code == 200 and [m["version"] for m in r.json()["models"]] == [b_id], r.text
            # Codes tagged with the unloaded version: 409, not a silent decode on the new one.
            r = await c.post("/v1/decode", json={"items": [{k: old["items"][0][k] for k in
                                                            ("top", "bottom", "version")}]}, headers=user)
            assert r.status_code == 409, r.text
            r = await c.delete(f"/admin/models/tiny@{b_id}", headers=ADMIN)
            assert r.status_code == 422  # the last one stays
            metrics = (await c.get("/metrics", headers=user)).text
            assert f'model="tiny@{b_id}"' in metrics and a_ref not in metrics

    run(main())


def test_serve_takes_repeated_models_and_a_folder_of_them(tiny_bundle, bundle_b, tmp_path, capsys):
    """``vqtok serve --model A --model NAME=B --models FOLDER``: every bundle served, in that order."""
    import httpx

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copytree(bundle_b, folder / "from-folder")
    with open(folder / "from-folder" / "manifest.json", "r+") as f:  # a second manifest: another version
        manifest = json.load(f)
        manifest["name"] = "renamed"
        f.seek(0)
        json.dump(manifest, f)
        f.truncate()
    (folder / "not-a-bundle").mkdir()
    with serve_process(tiny_bundle, args=("--model", f"b={bundle_b}", "--models", str(folder))) as (_, url):
        listed = httpx.get(f"{url}/v1/models").json()
    assert listed["default"] == "tiny"
    assert [m["name"] for m in listed["models"]] == ["tiny", "b", "from-folder"]
    # A broken bundle among them: the server refuses to start, with one line naming it.
    from service.api.server import serve

    (folder / "from-folder" / "encoder.onnx").write_bytes(b"broken")
    assert serve(models=[str(tiny_bundle)], models_dir=folder) == 2
    assert "encoder" in capsys.readouterr().err
    # One bundle named twice: refused at start-up too, not left unready after it.
    assert serve(models=[str(tiny_bundle), f"again={tiny_bundle}"]) == 2
    assert "same bundle" in capsys.readouterr().err
