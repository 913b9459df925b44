"""The web UI's server side without a browser: the page and its files are served (also
with API_TOKEN set, since they hold no data), /view redirects, GET /problems answers from
the delivery_problems and running_tasks views, and the vendored JavaScript matches the
npm lockfile (bin/build-ui). tests/test_install.py checks that the wheel ships the UI."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import uuid
from pathlib import Path

import pytest
from falcon import testing
from test_api import assert_error, claim, create, give_up_end_delivery, hook, running_task, spec
from test_api import buffer as buffer  # noqa: F401 (fixtures, by their fixture names)
from test_api import client as client  # noqa: F401

from taskrunner.api.app import create_app
from taskrunner.config import Config

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "taskrunner" / "ui" / "vendor"


@pytest.fixture
def guarded(pool, buffer) -> testing.TestClient:  # noqa: F811 (fixtures)
    return testing.TestClient(create_app(Config(api_token="tok"), pool, buffer))


def test_page_and_files_are_served_without_the_token(guarded):
    page = guarded.simulate_get("/ui")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/ui/static/app.js">' in page.text
    for name in ("app.js", "api.js", "dag.js", "status.js", "style.css", "vendor/dagre.esm.js"):
        result = guarded.simulate_get(f"/ui/static/{name}")
        assert result.status_code == 200, name
        assert result.content == (ROOT / "taskrunner" / "ui" / name).read_bytes()
    assert "javascript" in guarded.simulate_get("/ui/static/app.js").headers["content-type"]
    # the data still needs the token, and the static route does not leak other files
    assert guarded.simulate_get("/batches").status_code == 401
    assert guarded.simulate_get("/ui/static/../api/app.py").status_code == 404
    assert guarded.simulate_get("/ui/static/nothing.js").status_code == 404


def test_view_redirects_to_ui(client):  # noqa: F811
    result = client.simulate_get("/view")
    assert result.status_code == 302
    assert result.headers["location"].endswith("/ui")


def test_problems_lists_failed_deliveries_and_running_tasks(client, conn):  # noqa: F811
    task = running_task(client, conn, on_success=[hook("http://x.test/ok")])
    delivery_id = give_up_end_delivery(client, conn, task)
    running = create(client, spec("s"))["s"]
    claim(conn)

    result = client.simulate_get("/problems")

    assert result.status_code == 200, result.text
    (delivery,) = result.json["deliveries"]
    assert delivery == {
        "id": delivery_id,
        "task_id": task["id"],
        "task_name": "r",
        "batch_id": task["batch_id"],
        "trigger": "End",
        "status": "Failed",
        "attempt_count": 1,
        "next_attempt_at": delivery["next_attempt_at"],
        "last_status_code": 500,
        "last_error": "HTTP 500",
        "url": "http://x.test/ok",
        "verb": "Post",
    }
    assert [t["id"] for t in result.json["running"]] == [running["id"]]
    assert result.json["running"][0]["claimed_by"] == "w"

    # one batch only: the other batch's problems are left out
    only = client.simulate_get("/problems", params={"batch_id": running["batch_id"]})
    assert only.json["deliveries"] == []
    assert [t["id"] for t in only.json["running"]] == [running["id"]]
    assert client.simulate_get("/problems", params={"limit": "1"}).status_code == 200


def test_problems_refuses_bad_filters(client):  # noqa: F811
    assert_error(client.simulate_get("/problems", params={"batch_id": "x"}), 400, "batch_id")
    assert_error(client.simulate_get("/problems", params={"limit": "0"}), 400, "limit")
    empty = client.simulate_get("/problems", params={"batch_id": str(uuid.uuid4())})
    assert empty.json == {"deliveries": [], "running": []}


def test_vendored_javascript_matches_the_lockfile():
    """bin/build-ui's output is committed: each vendored file is the one its manifest
    names (sha256), from the package version and tarball the lockfile pins."""
    lock = json.loads((ROOT / "ui" / "package-lock.json").read_text())
    wanted = json.loads((ROOT / "ui" / "package.json").read_text())["dependencies"]
    manifest = json.loads((VENDOR / "manifest.json").read_text())
    assert set(manifest) == set(wanted)
    for package, entry in manifest.items():
        locked = lock["packages"][f"node_modules/{package}"]
        assert (entry["version"], entry["integrity"]) == (
            locked["version"],
            locked["integrity"],
        ), f"{package}: vendored files are stale; run bin/build-ui"
        assert wanted[package] == locked["version"], f"{package}: run bin/build-ui --update-lock"
        for name, digest in entry["files"].items():
            actual = hashlib.sha256((VENDOR / name).read_bytes()).hexdigest()
            assert actual == digest, f"{name} differs from the npm package; run bin/build-ui"
    shipped = {p.name for p in VENDOR.iterdir()} - {"manifest.json"}
    assert shipped == {n for e in manifest.values() for n in e["files"]}


def test_vendored_javascript_is_what_npm_ci_gives(tmp_path):
    """When the npm tarball is at hand (npm's cache or the registry), the vendored file is
    byte for byte the one in it, and the tarball matches the lockfile's integrity."""
    manifest = json.loads((VENDOR / "manifest.json").read_text())
    for package, entry in manifest.items():
        spec_ = f"{package}@{entry['version']}"
        try:
            out = subprocess.run(
                ["npm", "pack", spec_, "--json", "--pack-destination", str(tmp_path)],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"npm cannot fetch {spec_}: {exc}")
        (packed,) = json.loads(out.stdout)
        tarball = tmp_path / packed["filename"]
        algo, _, expected = entry["integrity"].partition("-")
        digest = base64.b64encode(hashlib.new(algo, tarball.read_bytes()).digest()).decode()
        assert digest == expected
        subprocess.run(["tar", "-xzf", str(tarball), "-C", str(tmp_path)], check=True)
        for name in entry["files"]:
            if name.endswith(".LICENSE"):
                continue
            packaged = tmp_path / "package" / "dist" / name
            assert packaged.read_bytes() == (VENDOR / name).read_bytes(), name
