"""The web UI: ``GET /ui`` is its one page, ``/ui/static/...`` its files (package data in
``taskrunner/ui/``, the vendored JavaScript built by ``bin/build-ui``), and ``GET /view``
redirects to ``/ui`` as in ArcRun. The files hold no data, so they need no token: the page
asks for one when the API answers 401 (docs in README, "Web UI")."""

from __future__ import annotations

from pathlib import Path

import falcon

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
STATIC_PREFIX = "/ui/static"

# the page loads only its own files; inline styles are set from script (bars, colours)
CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"


class UiPage:
    """``GET /ui``: the single page (routing happens in the URL fragment)."""

    def __init__(self) -> None:
        self.html = (UI_DIR / "index.html").read_bytes()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("Content-Security-Policy", CSP)
        resp.data = self.html


class ViewRedirect:
    """``GET /view``: ArcRun's UI path, kept for its users' bookmarks."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.status = 302
        resp.location = "/ui"


def install(app: falcon.App) -> None:
    """Add the UI's routes to ``app``."""
    app.add_route("/ui", UiPage())
    app.add_route("/view", ViewRedirect())
    app.add_static_route(STATIC_PREFIX, str(UI_DIR))
