"""A 1-level bundle (a plain VQ-VAE and one prior) goes through the whole API and the client: the
level names come from its manifest, not from the code."""
from __future__ import annotations

import httpx
import numpy as np
import pytest
from service_support import png_bytes, run, serving

from service.bundle import Bundle
from service.client import AsyncClient
from tests.conftest import TINY_CODES, TINY_SIZE, random_images

pytest.importorskip("torch")


def test_one_level_bundle_through_http_and_client(tiny_one_level_bundle):
    bundle = Bundle.load(tiny_one_level_bundle)
    assert bundle.level_names == ["bottom"]
    grid = bundle.levels["bottom"].grid(TINY_SIZE, TINY_SIZE)
    image = random_images(1)[0]

    async def go():
        async with serving(tiny_one_level_bundle) as (app, http):
            info = (await http.get("/v1/model")).json()
            assert [lv["name"] for lv in info["levels"]] == ["bottom"]

            r = await http.post("/v1/encode", files=[("images", ("a.png", png_bytes(image), "image/png"))])
            assert r.status_code == 200, r.text
            item = r.json()["items"][0]
            assert set(item) == {"height", "width", "version", "bottom"}
            assert np.array(item["bottom"]).shape == grid

            r = await http.post("/v1/decode", json={"items": [{"bottom": item["bottom"]}]})
            assert r.status_code == 200, r.text
            r = await http.post("/v1/decode", json={"items": [{"bottom": item["bottom"], "top": [[0]]}]})
            assert r.status_code == 422 and "not a level" in r.json()["error"]["message"]

            r = await http.post("/v1/sample", json={"n": 2, "seed": 3, "return_codes": True})
            assert r.status_code == 200, r.text
            codes = r.json()["codes"]
            assert [set(c) for c in codes] == [{"bottom", "version"}, {"bottom", "version"}]
            assert all(0 <= v < TINY_CODES for c in codes for row in c["bottom"] for v in row)

            transport = httpx.ASGITransport(app=app)
            async with AsyncClient("http://test", transport=transport) as client:
                (codes,) = await client.encode(image)
                assert list(codes) == ["bottom"] and codes.bottom.shape == grid
                with pytest.raises(AttributeError, match="levels"):
                    _ = codes.top
                (decoded,) = await client.decode(codes)
                assert decoded.size == (TINY_SIZE, TINY_SIZE)
                (recon,) = await client.reconstruct(image)
                assert np.array_equal(np.asarray(recon.image), np.asarray(decoded))
                samples = await client.sample(n=2, seed=3, return_codes=True)
                assert len(samples.images) == 2 and list(samples.codes[0]) == ["bottom"]
                again = await client.sample(n=2, seed=3)
                assert [np.asarray(a).tobytes() for a in samples.images] == [np.asarray(b).tobytes()
                                                                            for b in again.images]
    run(go())
