"""docs/sql.md against the database: every public function, view and table of schema
taskrunner has an entry there, every entry exists, and each carries its prose as a
``COMMENT ON`` (so ``\\df+`` and sql/schema.sql explain it too).

Public: names without a leading underscore; trigger functions (``tg_*``) are internal.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "sql.md"

RELATIONS = """
    SELECT c.relname AS name, obj_description(c.oid, 'pg_class') AS comment
    FROM pg_class c
    WHERE c.relnamespace = 'taskrunner'::regnamespace AND c.relkind = '{relkind}'
      AND c.relname !~ '^_'
"""

# kind: (section of docs/sql.md, pattern of an entry there, the public objects of that
# kind in the database, with their comments)
KINDS = {
    "function": (
        "Functions",
        r"^\| `(\w+)\(",
        """
        SELECT p.proname AS name, obj_description(p.oid, 'pg_proc') AS comment
        FROM pg_proc p
        WHERE p.pronamespace = 'taskrunner'::regnamespace
          AND p.proname !~ '^(_|tg_)'
        """,
    ),
    "view": ("Views", r"^\* `(\w+)[`(]", RELATIONS.format(relkind="v")),
    "table": ("Tables", r"^\* `(\w+)[`(]", RELATIONS.format(relkind="r")),
}


def _documented(section: str, pattern: str) -> set[str]:
    """The names listed in the ``## section`` of docs/sql.md."""
    text = DOC.read_text()
    body = re.search(rf"^## {section}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert body, f"docs/sql.md has no '## {section}' section"
    return set(re.findall(pattern, body[1], re.M))


@pytest.mark.parametrize("kind", KINDS)
def test_docs_list_every_public_object_and_nothing_else(conn, kind):
    section, pattern, query = KINDS[kind]
    in_db = {row["name"] for row in conn.execute(query).fetchall()}
    in_docs = _documented(section, pattern)
    assert not in_db - in_docs, (
        f"public {kind}s missing from docs/sql.md ({section}): {sorted(in_db - in_docs)}"
    )
    assert not in_docs - in_db, (
        f"docs/sql.md ({section}) lists {kind}s the database lacks: {sorted(in_docs - in_db)}"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_every_public_object_has_a_comment(conn, kind):
    _, _, query = KINDS[kind]
    bare = sorted({row["name"] for row in conn.execute(query).fetchall() if not row["comment"]})
    assert not bare, f"{kind}s without COMMENT ON {kind.upper()} (add it in a migration): {bare}"
