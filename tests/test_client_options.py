"""The client's bits= and include_input= options carry what the API answers."""
from __future__ import annotations

import httpx
import numpy as np
import pytest
from service_support import png_bytes, run, serving

from service.bundle import Bundle
from service.bundle.intake import IntakeLimits, take
from service.client import AsyncClient
from tests.conftest import random_images

pytest.importorskip("torch")


def test_bits_and_fitted_input_through_the_client(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    image = random_images(1, size=48)[0]  # not the model size: center_crop really resizes

    async def go():
        async with serving(tiny_bundle) as (app, http):
            raw = (await http.post("/v1/encode?bits=true",
                                   files=[("images", ("a.png", png_bytes(image), "image/png"))])).json()
            async with AsyncClient("http://test", transport=httpx.ASGITransport(app=app)) as client:
                (plain,) = await client.encode(image)
                assert plain.bits is None and list(plain) == bundle.level_names
                (codes,) = await client.encode(image, bits=True)
                assert codes.bits == raw["items"][0]["bits"]
                assert codes.bits["prior"] > 0 and codes.bits["uniform"] > 0
                assert list(codes) == bundle.level_names  # bits is not taken for a level
                (rec,) = await client.reconstruct(image, bits=True, include_input=True)
                assert rec.bits == codes.bits
                limits = IntakeLimits(bundle.image_size, bundle.size_multiple, 4096 ** 2, 1024 ** 2)
                fitted = take(png_bytes(image), "center_crop", limits)[0]
                np.testing.assert_array_equal(np.asarray(rec.input), fitted)
                (bare,) = await client.reconstruct(image)
                assert bare.bits is None and bare.input is None
    run(go())
