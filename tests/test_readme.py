"""README.md tells the truth: every setting the code reads is in its configuration table
(and nothing else is), and the curl walkthrough works when pasted (run against a real
``taskrunner up`` and the example webhook target)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from procs import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Variables the code reads that are not settings of ours.
NOT_SETTINGS = {"PATH"}
# How the code reads a variable: os.environ.get("X"), env.get("X"), _int(env, "X", ...),
# os.environ["X"], os.getenv("X").
_READ = re.compile(
    r"""(?:environ\.get|env\.get|getenv|environ\[|_(?:int|float|bool|switch)\(\s*env,)\s*\(?\s*["']([A-Z][A-Z0-9_]+)["']"""
)


def section(text: str, heading: str) -> str:
    """The text of a ``## heading`` section, up to the next heading of the same level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n")
    end = text.find(f"\n{level} ", start + len(heading))
    return text[start : end if end != -1 else None]


def settings_read_by_code() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "taskrunner").rglob("*.py"):
        names.update(_READ.findall(path.read_text()))
    return names - NOT_SETTINGS


def settings_in_readme() -> set[str]:
    table = section(README.read_text(), "## Configuration")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}


def test_the_settings_scan_finds_what_config_reads() -> None:
    # the scan itself must work, or the next test would pass on nothing
    found = settings_read_by_code()
    assert {"DATABASE_URL", "PORT", "HOST", "COUNTER_FLUSH_INTERVAL", "ACCESS_LOG"} <= found
    assert {"TASKRUNNER_STATE_DIR", "PROMETHEUS_MULTIPROC_DIR", "RUST_LOG"} <= found


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    code, readme = settings_read_by_code(), settings_in_readme()

    assert code - readme == set(), "read by taskrunner/ but missing from README's table"
    assert readme - code == set(), "in README's table but read nowhere in taskrunner/"


# -- the walkthrough, run as pasted ---------------------------------------------------------

WALKTHROUGH_MARK = "<!-- walkthrough -->"
# the status a curl line answers: its comment starts with it ("# 200: ...", "# 409")
_EXPECTED = re.compile(r"#\s([1-5]\d\d)\b")
# Records the status of every curl the walkthrough itself runs (not those inside its helper
# functions) on stderr, leaving stdout (which the walkthrough captures) as it is.
CURL_RECORDER = r"""
curl() {
  if [ "${FUNCNAME[1]:-main}" = main ]; then
    # to a file of its own: the background processes (up, the target) share stderr
    command curl -w '%{stderr}@@status %{http_code}\n' "$@" 2>>"$CURL_STATUS_FILE"
  else
    command curl "$@"
  fi
}
"""


def walkthrough_blocks(text: str) -> list[str]:
    """The ```bash blocks right after a ``<!-- walkthrough -->`` mark, in order."""
    pattern = re.escape(WALKTHROUGH_MARK) + r"\s*```bash\n(.*?)```"
    return re.findall(pattern, text, flags=re.S)


def expected_statuses(blocks: list[str]) -> list[int]:
    return [int(code) for block in blocks for code in _EXPECTED.findall(block)]


def test_walkthrough_blocks_are_marked_and_every_curl_says_its_status() -> None:
    blocks = walkthrough_blocks(README.read_text())

    assert len(blocks) >= 5
    assert "bin/taskrunner up &" in blocks[0] and "examples/target.py" in blocks[0]
    for block in blocks:
        for line in block.splitlines():
            if line.startswith(("curl ", "CREATED=$(curl")) or "; curl " in line:
                assert line.count("curl ") <= 1, line  # one status per line
    assert len(expected_statuses(blocks)) >= 20


def _run_walkthrough(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the script with bash in its own process group; whatever it leaves behind (on a
    failure: `up`, the target) is stopped afterwards."""
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,
    )
    try:
        out, err = proc.communicate(timeout=WALKTHROUGH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"the walkthrough did not finish in {WALKTHROUGH_TIMEOUT}s:\n{out}\n{err}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


WALKTHROUGH_TIMEOUT = 300


@pytest.mark.slow
def test_the_walkthrough_works_when_pasted(db_url: str, conn, tmp_path: Path) -> None:
    blocks = walkthrough_blocks(README.read_text())
    api_port, target_port = free_port(), free_port()
    # the README's ports, moved to free ones; nothing else is changed
    script = "\n".join(blocks).replace("8085", str(api_port)).replace("9000", str(target_port))
    env = {
        **os.environ,
        "DATABASE_URL": db_url,  # this test's migrated database instead of the embedded one
        "PORT": str(api_port),
        "TASKRUNNER_STATE_DIR": str(tmp_path),
        "API_PROCESSES": "1",
        "WORKER_PROCESSES": "1",
        "CURL_STATUS_FILE": str(tmp_path / "curl-statuses"),
    }
    env.pop("WEBHOOK_ALLOW_PRIVATE", None)  # as a newcomer has it: `up` allows localhost

    result = _run_walkthrough(CURL_RECORDER + script, env)
    transcript = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"

    recorded = Path(env["CURL_STATUS_FILE"]).read_text()
    statuses = [int(s) for s in re.findall(r"^@@status (\d+)$", recorded, flags=re.M)]
    assert statuses == expected_statuses(blocks), transcript
    assert result.returncode == 0, transcript
    assert "taskrunner is up" in result.stdout, transcript

    tasks = {
        r["local_id"]: r
        for r in conn.execute(
            "SELECT local_id, status::text, success, failures FROM taskrunner.task"
        ).fetchall()
    }
    assert tasks["ingest-1"] == {
        "local_id": "ingest-1",
        "status": "success",
        "success": 3,
        "failures": 0,
    }
    assert tasks["cluster"] == {
        "local_id": "cluster",
        "status": "success",
        "success": 15,
        "failures": 1,
    }
    assert tasks["report"]["status"] == "canceled"
    # the target got the start of ingest-1 and of cluster (/hold), and cluster's on_success
    for path in ("/start", "/hold", "/done"):
        assert f"target: POST {path} " in result.stdout, transcript
    # the Python quick start: built with taskrunner.client, watched to its end
    assert tasks["extract"]["status"] == tasks["load"]["status"] == "success"
    assert "every task succeeded" in result.stdout, transcript
