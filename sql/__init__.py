"""The SQL files, shipped in the package as ``taskrunner.sql`` (see pyproject.toml).

``migrations/`` holds the dbmate migrations and ``schema.sql`` their dumped result; this
file only makes the directory a package, so ``importlib.resources`` finds it in a wheel and
in an editable install alike.
"""
