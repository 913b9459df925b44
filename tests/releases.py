"""The released migrations, read from ``sql/migrations/released.sha256``.

That file is the append-only contract: every migration that shipped in a release is listed
with its SHA-256 (``sha256sum`` format, so ``cd sql/migrations && sha256sum -c
released.sha256`` checks it by hand) under a ``# vX.Y.Z`` line naming the release. A
listed file never changes again; a schema change is a new migration.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from taskrunner import migrate

RELEASED_FILE = migrate.MIGRATIONS_DIR / "released.sha256"
FIX = (
    "migrations are append-only once released: restore the file as it was released and "
    "change the schema with a new migration (a later version, with its migrate:down)"
)


@dataclass(frozen=True)
class Released:
    release: str  # "v0.1.0"
    name: str  # the migration's file name
    sha256: str


def released(listing: Path = RELEASED_FILE) -> list[Released]:
    """Every listed migration, in file order, with the release it shipped in."""
    entries: list[Released] = []
    release = None
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        marker = re.fullmatch(r"#\s*(v\d+\.\d+\.\d+)\s*", line)
        if marker:
            release = marker[1]
            continue
        if not line.strip() or line.startswith("#"):
            continue
        entry = re.fullmatch(r"([0-9a-f]{64}) [ *](\S+)", line)
        if not entry or release is None:
            raise ValueError(f"{listing}:{number}: not '<sha256>  <file>' under a '# vX.Y.Z'")
        entries.append(Released(release, entry[2], entry[1]))
    return entries


def migration_files(migrations_dir: Path = migrate.MIGRATIONS_DIR) -> list[Path]:
    """The migration files in the order dbmate applies them."""
    return sorted(migrations_dir.glob("*.sql"))


def version(name: str) -> str:
    return name.split("_", 1)[0]


def problems(
    migrations_dir: Path = migrate.MIGRATIONS_DIR, listing: Path = RELEASED_FILE
) -> list[str]:
    """How the migrations break the append-only rule (empty when they keep it)."""
    found: list[str] = []
    entries = released(listing)
    for entry in entries:
        path = migrations_dir / entry.name
        if not path.is_file():
            found.append(f"{entry.name} (released in {entry.release}) was deleted or renamed")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != entry.sha256:
            found.append(f"{entry.name} (released in {entry.release}) was changed")
    listed = {entry.name for entry in entries}
    newest = max((version(name) for name in listed), default="")
    for path in migration_files(migrations_dir):
        if path.name not in listed and version(path.name) <= newest:
            found.append(
                f"{path.name} is not released but sorts before released {newest}: "
                "databases already at the release would apply it out of order"
            )
    return found


def copy_release(release: str, target: Path) -> list[str]:
    """Copy the migrations of ``release`` and every earlier one into ``target`` (a
    migrations directory for dbmate that ends at that release); returns their names."""
    entries = released()
    last = max(i for i, e in enumerate(entries) if e.release == release)
    names = [e.name for e in entries[: last + 1]]
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(migrate.MIGRATIONS_DIR / name, target / name)
    return names
