"""docs/api.md agrees with the validation schemas and the database: every field of each
input object is documented (and nothing else), the required ones are marked required, the
documented defaults are the columns' defaults, and the statuses are the API's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from taskrunner.api import openapi
from taskrunner.api.validation import SCHEMAS
from taskrunner.vocabulary import STATUS_LABELS as STATUSES

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
_TASK = SCHEMAS["batch"]["items"]
_ACTION = _TASK["properties"]["on_start"]
# section heading -> the schema object its table documents
OBJECTS = {
    "## Task": _TASK,
    "## Dependency": _TASK["properties"]["dependencies"]["items"],
    "## Action": _ACTION,
    "## Params": _ACTION["properties"]["params"],
    "## Rule": SCHEMAS["rule"],
    "## Matcher": SCHEMAS["rule"]["properties"]["matcher"],
    "## Retry": _TASK["properties"]["retry"],
    "## Capacity rule": SCHEMAS["capacity_rule"],
    "## RateLimit rule": SCHEMAS["rate_limit_rule"],
    "## PATCH /task/{id}": SCHEMAS["patch"],
    "## PUT /task": SCHEMAS["put_item"],
}


def section(heading: str) -> str:
    text = DOC.read_text()
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else None]


def table(heading: str) -> dict[str, list[str]]:
    """The section's table rows by their first cell's names: {name: [cells...]}."""
    rows: dict[str, list[str]] = {}
    for line in section(heading).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `"):
            for name in re.findall(r"`([^`]+)`", cells[0]):
                rows[name] = cells
    return rows


@pytest.mark.parametrize("heading", list(OBJECTS))
def test_every_field_is_documented_and_nothing_else(heading: str) -> None:
    schema, rows = OBJECTS[heading], table(heading)

    assert set(rows) == set(schema["properties"]), heading


@pytest.mark.parametrize("heading", list(OBJECTS))
def test_required_fields_are_marked_required(heading: str) -> None:
    schema, rows = OBJECTS[heading], table(heading)
    marked = {name for name, cells in rows.items() if cells[2] == "yes"}

    assert marked == set(schema.get("required", [])), heading


def test_the_seed_spellings_are_documented() -> None:
    rule = section("## Rule")
    for spelling in ('{"Concurency":', '{"Concurrency":', '"type": "Concurency"'):
        assert spelling in rule


@pytest.mark.parametrize("column", ["timeout", "priority"])
def test_documented_defaults_are_the_database_defaults(conn, column: str) -> None:
    default = conn.execute(
        "SELECT column_default FROM information_schema.columns "
        "WHERE table_schema = 'taskrunner' AND table_name = 'task' AND column_name = %s",
        (column,),
    ).fetchone()["column_default"]

    assert table("## Task")[column][3] == f"`{default}`"


def test_statuses_are_the_api_statuses_and_timeout_is_a_reason() -> None:
    statuses = section("## Statuses")
    listed = re.findall(r"^\| `(\w+)` \|", statuses, flags=re.M)

    assert sorted(listed) == sorted(STATUSES)
    assert "**`Timeout` is a failure reason, not a status.**" in statuses


def test_list_parameters_are_the_openapi_parameters() -> None:
    documented = set(table("## GET /task query parameters"))
    described = {p["name"] for p in openapi.document()["paths"]["/task"]["get"]["parameters"]}

    assert documented == described
