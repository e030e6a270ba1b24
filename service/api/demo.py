"""The demo page at ``/demo``: static HTML, CSS and JavaScript shipped in the package (``static/``).

No build step and nothing from elsewhere: the page calls this server's ``/v1`` API with relative
URLs, and its Content-Security-Policy lets the browser load nothing but this origin (plus the
``data:``/``blob:`` URLs the page makes itself for PNGs and the codes download). The page is open;
the API it calls still needs a key when keys are set, and the page asks for one on a 401.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
PAGE = "/demo"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

demo = APIRouter(include_in_schema=False)


@demo.get(PAGE)
async def page() -> FileResponse:
    return FileResponse(STATIC / "demo.html", media_type="text/html",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})


@demo.get(PAGE + "/")
async def page_slash() -> RedirectResponse:
    # The page's URLs are relative to /demo; from /demo/ they would miss.
    return RedirectResponse(PAGE, status_code=308)


def install_demo(app: FastAPI) -> None:
    app.include_router(demo)
    app.mount(PAGE + "/static", StaticFiles(directory=STATIC), name="demo-static")
