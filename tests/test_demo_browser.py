"""The demo page in a real browser: Debian's chromium (``/usr/bin/chromium``) driven by Playwright,
against a real ``vqtok serve`` subprocess with the shipped bundle (plus a tiny second bundle for the
model selector). Never a downloaded browser: the tests skip only when that chromium is absent
(``.ci/run`` installs it).

Every value the page shows is checked against the API's own answer for the same input.

``VQTOK_DEMO_SCREENSHOT=docs/demo.png pytest tests/test_demo_browser.py`` also writes the README's
screenshot.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import random_images
from PIL import Image
from service_support import ROOT, image_files, png_bytes, serve_process, without_priors

from service.api.errors import error_body
from service.bundle import DEFAULT_BUNDLE

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "demo-test-key"
ADMIN_KEY = "demo-admin-key"
BODY_LIMIT = 40_000  # bytes: the keyed server refuses bigger uploads with a 413
TIMEOUT_MS = 20_000

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright comes with the [dev] extra")
pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is not installed")


# --- fixtures: one browser, two servers (open; keys and a small body limit) ----------------------
@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="vqtok-chromium-") as profile:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=ARGS,
            viewport={"width": 1100, "height": 1000}, accept_downloads=True)
        yield context
        context.close()


@pytest.fixture(scope="module")
def server():
    with serve_process(DEFAULT_BUNDLE) as (_, url):
        yield url


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """Keys, a small body limit, and a bundle without priors (no sampling: a real 503; no prior bits)."""
    bundle = without_priors(DEFAULT_BUNDLE, tmp_path_factory.mktemp("bundle") / "no_priors")
    env = {"VQTOK_API_KEYS": KEY, "VQTOK_MAX_BODY_BYTES": str(BODY_LIMIT)}
    with serve_process(bundle, env=env) as (_, url):
        yield url


@pytest.fixture
def two_model_server(tmp_path_factory):
    """The shipped bundle (the default) and a second one, a tiny bundle served as ``b``; with the
    admin API, so a test can unload ``b`` under the page (hence one server per test)."""
    pytest.importorskip("torch", reason="the tiny bundle is exported from torch models")
    from conftest import export_tiny_bundle

    bundle_b = export_tiny_bundle(tmp_path_factory.mktemp("bundle") / "b", seed=1)
    env = {"VQTOK_EXTRA_MODELS": f"b={bundle_b}", "VQTOK_ADMIN_KEY": ADMIN_KEY}
    with serve_process(DEFAULT_BUNDLE, env=env) as (_, url):
        yield url


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.requested = []  # every URL the page asked for, to check none left the origin
    page.on("request", lambda req: page.requested.append(req.url))
    page.errors = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    yield page
    assert not page.errors, page.errors  # no uncaught JavaScript error in any test
    page.close()


def open_demo(page, url: str) -> None:
    page.goto(f"{url}/demo")


def only_same_origin(page, url: str) -> None:
    foreign = [u for u in page.requested if not u.startswith((url + "/", "data:", "blob:"))]
    assert not foreign, foreign


def pixels_of(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def photo(tmp_path: Path) -> tuple[Path, bytes]:
    """A real photograph when scikit-image is there (a held-out one), else a smooth synthetic image;
    not square, so the fit has something to do."""
    try:
        from skimage import data

        pixels = data.chelsea()  # 300x451
    except ImportError:
        pixels = random_images(1, size=120, seed=4)[0][:, :100]
    blob = png_bytes(pixels)
    path = tmp_path / "photo.png"
    path.write_bytes(blob)
    return path, blob


def api_error(url: str, path: str, **kw) -> str:
    """The message the API itself answers, formatted as the page shows it."""
    r = httpx.post(f"{url}{path}", timeout=30, **kw)
    assert r.status_code >= 400, r.text
    err = r.json()["error"]
    return f"{r.status_code} {err['code']}: {err['message']}"


def answer_with(status: int, code: str, message: str):
    """A route handler that answers with the API's error body."""
    def handler(route) -> None:
        route.fulfill(status=status, content_type="application/json", body=json.dumps(error_body(code, message)))
    return handler


def drop_file(page, selector: str, data: bytes, name: str) -> None:
    """Drop a file on ``selector`` as a user dragging it from the desktop would."""
    transfer = page.evaluate_handle(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: "image/png" }));
            return dt;
        }""", [base64.b64encode(data).decode(), name])
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def wait_for_encoding(page, levels: int) -> None:
    page.wait_for_selector("#encode-result:not([hidden])")
    page.wait_for_function(f"() => document.querySelectorAll('canvas.heatmap').length === {levels}")


def cell_centre(page, level: str, row: int, col: int) -> tuple[float, float]:
    canvas = page.locator(f"canvas.heatmap[data-level='{level}']")
    box = canvas.bounding_box()
    cell = float(canvas.get_attribute("data-cell"))
    return box["x"] + 1 + (col + 0.5) * cell, box["y"] + 1 + (row + 0.5) * cell  # 1 px border


def canvas_pixel(page, level: str, x: int, y: int) -> list[int]:
    return page.evaluate(
        "([level, x, y]) => Array.from(document.querySelector(`canvas.heatmap[data-level='${level}']`)"
        ".getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3))", [level, x, y])


# --- tests -----------------------------------------------------------------------------------------
def test_encode_panel_shows_the_apis_answers_and_the_heatmaps_respond(page, server, tmp_path):
    path, blob = photo(tmp_path)
    encoded = httpx.post(f"{server}/v1/encode?bits=true", files=image_files([blob]), timeout=30).json()["items"][0]
    rec = httpx.post(f"{server}/v1/reconstruct?include_input=true", files=image_files([blob]),
                     timeout=30).json()["items"][0]
    levels = [lv["name"] for lv in httpx.get(f"{server}/v1/model").json()["levels"]]

    open_demo(page, server)
    page.wait_for_function("() => document.getElementById('model-info').textContent.startsWith('model ')")
    page.set_input_files("#file-input", str(path))
    wait_for_encoding(page, len(levels))

    # The images are the API's: the fitted input and the reconstruction, pixel for pixel.
    assert np.array_equal(pixels_of(page.get_attribute("#input-image", "src")), pixels_of("data:image/png;base64,"
                                                                                          + rec["input"]))
    assert np.array_equal(pixels_of(page.get_attribute("#recon-image", "src")), pixels_of("data:image/png;base64,"
                                                                                          + rec["image"]))
    # PSNR and bits: the API's numbers, shown rounded, carried exactly.
    assert float(page.get_attribute("#psnr", "data-value")) == rec["psnr"]
    assert page.text_content("#psnr") == f"{rec['psnr']:.2f} dB"
    assert float(page.get_attribute("#bits-uniform", "data-value")) == encoded["bits"]["uniform"]
    assert float(page.get_attribute("#bits-prior", "data-value")) == encoded["bits"]["prior"]
    assert page.text_content("#bits-prior") == f"{round(encoded['bits']['prior']):,} bits"

    for level in levels:
        grid = encoded[level]
        # Hover: level, position and code id of the cell under the pointer.
        for row, col in ((0, 0), (len(grid) - 1, len(grid[0]) - 1), (len(grid) // 2, 1)):
            page.mouse.move(*cell_centre(page, level, row, col))
            assert page.text_content("#cell-info") == f"{level} · row {row}, col {col} · code {grid[row][col]}"

        # Click: every cell with that code is highlighted, the others dimmed.
        row, col = len(grid) // 2, len(grid[0]) // 2
        code = grid[row][col]
        cell = int(page.get_attribute(f"canvas.heatmap[data-level='{level}']", "data-cell"))
        other = next((r, c) for r in range(len(grid)) for c in range(len(grid[0])) if grid[r][c] != code)

        def centre(rc: tuple[int, int], cell: int = cell) -> tuple[int, int]:  # in canvas pixels
            return rc[1] * cell + cell // 2, rc[0] * cell + cell // 2

        before_same = canvas_pixel(page, level, *centre((row, col)))
        before_other = canvas_pixel(page, level, *centre(other))
        page.mouse.click(*cell_centre(page, level, row, col))
        count = sum(v == code for line in grid for v in line)
        cells = len(grid) * len(grid[0])
        assert page.get_attribute(f"canvas.heatmap[data-level='{level}']", "data-highlighted") == str(count)
        assert page.text_content("#selection").startswith(f"{level} code {code}: {count} of {cells} cells")
        assert canvas_pixel(page, level, *centre((row, col))) == before_same
        assert sum(canvas_pixel(page, level, *centre(other))) < sum(before_other)
        page.mouse.click(*cell_centre(page, level, row, col))  # again: cleared
        assert canvas_pixel(page, level, *centre(other)) == before_other
    assert page.is_hidden("#error")
    only_same_origin(page, server)


def test_sample_panel_same_seed_same_pixels_and_codes_download(page, server):
    open_demo(page, server)
    page.fill("#sample-n", "4")
    page.fill("#sample-seed", "1234")
    page.fill("#sample-top-k", "50")

    def sample_once() -> list[np.ndarray]:
        page.click("#sample-submit")
        page.wait_for_function("() => document.querySelectorAll('img.sample').length === 4 && "
                               "document.getElementById('sample-status').textContent === 'seed 1234'")
        return [pixels_of(img.get_attribute("src")) for img in page.query_selector_all("img.sample")]

    first = sample_once()
    page.evaluate("document.getElementById('samples').replaceChildren()")
    page.evaluate("document.getElementById('sample-status').textContent = ''")
    second = sample_once()
    assert len(first) == 4 and all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[0], first[1])  # four samples, not one four times

    # The same request to the API gives the same pixels, and the download holds its codes.
    api = httpx.post(f"{server}/v1/sample", json={"n": 4, "seed": 1234, "top_k": 50, "return_codes": True},
                     timeout=60).json()
    assert all(np.array_equal(a, pixels_of("data:image/png;base64," + b)) for a, b in zip(first, api["images"]))
    link = page.locator("#download-codes")
    assert link.get_attribute("download") == "vqtok-samples-seed-1234.json"
    with page.expect_download() as info:
        link.click()
    saved = json.loads(Path(info.value.path()).read_text())
    assert saved["codes"] == api["codes"] and saved["seed"] == 1234 and saved["top_k"] == 50

    # Values go to the API as typed; its 422 message is what the page shows.
    page.fill("#sample-n", "0")
    page.click("#sample-submit")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error") == api_error(server, "/v1/sample", json={"n": 0, "seed": 1234, "top_k": 50,
                                                                                 "return_codes": True})
    only_same_origin(page, server)


def test_api_errors_show_their_message(page, server, tmp_path):
    open_demo(page, server)
    page.wait_for_function("() => document.getElementById('model-info').textContent.startsWith('model ')")
    # 400: not an image.
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"these are notes, not a picture")
    page.set_input_files("#file-input", str(bad))
    page.wait_for_selector("#error:not([hidden])")
    want = api_error(server, "/v1/encode?fit=center_crop&bits=true", files=image_files([bad.read_bytes()]))
    assert page.text_content("#error") == want and want.startswith("400 invalid_image: ")

    # 422: fit=none with sides that are not multiples of the coarsest stride.
    odd = tmp_path / "odd.png"
    odd.write_bytes(png_bytes(random_images(1, size=68)[0][:, :66]))
    page.select_option("#fit", "none")
    page.set_input_files("#file-input", str(odd))
    page.wait_for_function("() => document.getElementById('error').dataset.status === '422'")
    assert page.text_content("#error") == api_error(server, "/v1/encode?fit=none&bits=true",
                                                    files=image_files([odd.read_bytes()]))

    # A 415 cannot be provoked from this page (it always sends a valid content type), nor a full
    # queue's 503 from one browser: the page is handed the API's own error bodies for those.
    # (A real 503 is in the keys test: sampling from a bundle without priors.)
    for status, code, message in ((503, "overloaded", "the sample queue is full; retry later"),
                                  (415, "unsupported_media_type", "expected Content-Type application/json")):
        page.route("**/v1/sample?*", answer_with(status, code, message))  # the page names ?model=
        page.click("#sample-submit")
        page.wait_for_function(f"() => document.getElementById('error').dataset.status === '{status}'")
        assert page.text_content("#error") == f"{status} {code}: {message}"
        page.unroute("**/v1/sample?*")


def test_with_api_keys_the_page_asks_for_one_and_sends_it(page, keyed_server, tmp_path):
    auth_headers = []
    page.on("request", lambda req: auth_headers.append(req.headers.get("authorization"))
            if "/v1/" in req.url else None)
    open_demo(page, keyed_server)
    page.wait_for_selector("#key-form:not([hidden])")
    assert page.text_content("#error") == api_error(keyed_server, "/v1/encode")  # the 401's own message
    page.fill("#api-key", KEY)
    page.click("#key-submit")
    page.wait_for_function("() => document.getElementById('model-info').textContent.startsWith('model ')")
    assert page.is_hidden("#key-form") and page.is_hidden("#error")

    # 413: over this server's body limit.
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)))
    assert big.stat().st_size > BODY_LIMIT
    page.set_input_files("#file-input", str(big))
    page.wait_for_selector("#error:not([hidden])")
    want = api_error(keyed_server, "/v1/encode", headers={"Authorization": f"Bearer {KEY}"},
                     files=image_files([big.read_bytes()]))
    assert page.text_content("#error") == want and want.startswith("413 ")

    # Dropped rather than chosen: the drop zone takes the file; this bundle has no priors to score it.
    small = png_bytes(random_images(1, size=64, seed=5)[0])
    assert len(small) < BODY_LIMIT
    drop_file(page, "#drop-zone", small, "small.png")
    wait_for_encoding(page, 2)
    assert page.is_hidden("#error")
    assert page.text_content("#bits-prior") == "n/a (no priors)"
    assert float(page.get_attribute("#bits-uniform", "data-value")) > 0

    # A real 503: this bundle cannot sample.
    page.click("#sample-submit")
    page.wait_for_function("() => document.getElementById('error').dataset.status === '503'")
    assert page.text_content("#error") == api_error(keyed_server, "/v1/sample", json={"n": 8},
                                                    headers={"Authorization": f"Bearer {KEY}"})
    assert auth_headers[0] is None and auth_headers[-1] == f"Bearer {KEY}"


def test_model_selector_runs_every_call_on_the_chosen_bundle_and_shows_its_version(page, two_model_server,
                                                                                   tmp_path):
    url = two_model_server
    listed = httpx.get(f"{url}/v1/models", timeout=30).json()
    by_name = {m["name"]: m for m in listed["models"]}
    a, b = by_name[listed["default"]], by_name["b"]
    assert a["version"] != b["version"]
    path, blob = photo(tmp_path)

    open_demo(page, url)
    # The selector lists both, the default chosen; the header names the model in use, version and all.
    page.wait_for_function("() => document.getElementById('model-info').textContent.startsWith('model ')")
    assert page.eval_on_selector_all("#model-select option", "os => os.map((o) => o.value)") == [a["ref"], b["ref"]]
    assert page.input_value("#model-select") == a["ref"] and page.is_enabled("#model-select")
    assert page.get_attribute("#model-info", "data-version") == a["version"]
    assert page.text_content("#model-info").startswith(f"model {a['ref']}, ")

    page.set_input_files("#file-input", str(path))
    wait_for_encoding(page, len(a["levels"]))
    assert page.get_attribute("#codes-version", "data-version") == a["version"]

    # Choosing b encodes the same image again, on b: the codes shown are b's, tagged with b's version.
    before_switch = len(page.requested)
    page.select_option("#model-select", b["ref"])
    page.wait_for_function(f"() => document.getElementById('codes-version').dataset.version === '{b['version']}' "
                           "&& !document.getElementById('encode-result').hidden")
    wait_for_encoding(page, len(b["levels"]))
    assert page.text_content("#codes-version") == f"version {b['version']}"
    assert page.get_attribute("#recon-version", "data-version") == b["version"]
    assert page.text_content("#recon-version") == b["ref"]
    assert page.get_attribute("#model-info", "data-version") == b["version"]
    encoded = httpx.post(f"{url}/v1/encode?model=b&bits=true", files=image_files([blob]), timeout=30).json()
    rec = httpx.post(f"{url}/v1/reconstruct?model=b", files=image_files([blob]), timeout=30).json()
    item = encoded["items"][0]
    assert item["version"] == rec["version"] == b["version"]
    assert float(page.get_attribute("#psnr", "data-value")) == rec["items"][0]["psnr"]
    assert float(page.get_attribute("#bits-prior", "data-value")) == item["bits"]["prior"]
    grid = item[b["levels"][-1]]
    row, col = len(grid) - 1, len(grid[0]) - 1
    page.mouse.move(*cell_centre(page, b["levels"][-1], row, col))
    assert page.text_content("#cell-info") == f"{b['levels'][-1]} · row {row}, col {col} · code {grid[row][col]}"

    # Sampling on b: the page names b's version next to the codes, and the download holds b's codes.
    page.fill("#sample-n", "2")
    page.fill("#sample-seed", "99")
    page.click("#sample-submit")
    page.wait_for_function("() => document.getElementById('sample-status').textContent === 'seed 99'")
    assert page.get_attribute("#sample-version", "data-version") == b["version"]
    api = httpx.post(f"{url}/v1/sample?model=b", json={"n": 2, "seed": 99, "return_codes": True}, timeout=60).json()
    assert [pixels_of(img.get_attribute("src")).shape for img in page.query_selector_all("img.sample")] == \
        [(b["image_size"], b["image_size"], 3)] * 2
    with page.expect_download() as info:
        page.click("#download-codes")
    saved = json.loads(Path(info.value.path()).read_text())
    assert saved["version"] == b["version"] and saved["codes"] == api["codes"]
    assert {c["version"] for c in saved["codes"]} == {b["version"]}

    # Every API call after the switch named b, version and all.
    calls = [u for u in page.requested[before_switch:] if "/v1/" in u]
    assert calls and all(httpx.URL(u).params.get("model") == b["ref"] for u in calls), calls
    assert page.is_hidden("#error")

    # b unloaded under the page: its next call gets the API's 404, and the selector is refreshed.
    r = httpx.delete(f"{url}/admin/models/{b['ref']}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    page.click("#sample-submit")
    page.wait_for_function("() => document.getElementById('error').dataset.status === '404'")
    assert page.text_content("#error") == api_error(url, f"/v1/sample?model={b['ref']}", json={"n": 2})
    assert page.get_attribute("#error", "data-code") == "model_not_found"
    page.wait_for_function("() => document.getElementById('model-select').options.length === 1")
    assert page.input_value("#model-select") == a["ref"] and page.is_disabled("#model-select")
    page.wait_for_function(f"() => document.getElementById('model-info').dataset.version === '{a['version']}'")
    only_same_origin(page, url)


def test_with_one_bundle_the_selector_shows_it_and_is_disabled(page, server):
    listed = httpx.get(f"{server}/v1/models", timeout=30).json()
    (only,) = listed["models"]
    open_demo(page, server)
    page.wait_for_function("() => document.getElementById('model-info').textContent.startsWith('model ')")
    assert page.input_value("#model-select") == only["ref"] and page.is_disabled("#model-select")
    assert page.text_content("#model-select option") == f"{only['ref']} (default)"


def test_screenshot(page, server, tmp_path):
    """The README's picture: a held-out photo encoded, its most used top code highlighted, eight samples."""
    path, blob = photo(tmp_path)
    top = np.array(httpx.post(f"{server}/v1/encode", files=image_files([blob]), timeout=30).json()["items"][0]["top"])
    codes, counts = np.unique(top, return_counts=True)
    row, col = np.argwhere(top == codes[counts.argmax()])[0]
    open_demo(page, server)
    page.set_input_files("#file-input", str(path))
    wait_for_encoding(page, 2)
    page.mouse.click(*cell_centre(page, "top", int(row), int(col)))
    page.fill("#sample-seed", "7")
    page.click("#sample-submit")
    page.wait_for_function("() => document.querySelectorAll('img.sample').length === 8")
    page.mouse.move(*cell_centre(page, "bottom", 8, 9))
    page.wait_for_function("() => document.getElementById('cell-info').textContent.startsWith('bottom')")
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] >= 1000
    target = os.environ.get("VQTOK_DEMO_SCREENSHOT")
    if target:
        shutil.copy(shot, ROOT / target)
