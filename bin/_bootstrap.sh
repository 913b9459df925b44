# Sourced by bin/taskrunner and bin/test: make sure .venv exists and matches pyproject.toml.
#
# The venv is (re)installed with `pip install -e '.[dev,bench]'` on first use and whenever
# pyproject.toml changed since the last install (its hash is kept in .venv/.pyproject.sha256).
# Quiet on the happy path; pip's output is shown only when the install fails.

_tr_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "taskrunner: Python >= 3.11 is required (set PYTHON=/path/to/python3)" >&2
    return 1
}

_tr_hash() {
    { sha256sum pyproject.toml 2>/dev/null || shasum -a 256 pyproject.toml; } | cut -d' ' -f1
}

tr_bootstrap() {
    local stamp=.venv/.pyproject.sha256 want log python
    want="$(_tr_hash)"
    if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
        && .venv/bin/python -c '' 2>/dev/null; then
        return 0
    fi
    mkdir -p .venv
    # Two commands started at once in one checkout must not install into .venv together.
    if command -v flock >/dev/null 2>&1; then
        exec 9>.venv/.bootstrap.lock
        flock 9
        if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
            exec 9>&-
            return 0
        fi
    fi
    python="$(_tr_python)" || return 1
    log=.venv/.bootstrap.log
    echo "taskrunner: installing the project into .venv (pyproject.toml is new or changed)..." >&2
    if ! .venv/bin/python -c '' 2>/dev/null; then
        "$python" -m venv --clear .venv >"$log" 2>&1 || { cat "$log" >&2; return 1; }
    fi
    if ! .venv/bin/python -m pip install --disable-pip-version-check -q -e '.[dev,bench]' \
        >"$log" 2>&1; then
        cat "$log" >&2
        echo "taskrunner: 'pip install -e .[dev,bench]' failed (log above, also in $log)" >&2
        return 1
    fi
    echo "$want" >"$stamp"
    exec 9>&-
}
