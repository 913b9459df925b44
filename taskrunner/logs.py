"""The one place that configures logging, for every process (``up``, the API, workers).

``dict_config(config)`` builds the ``logging.config.dictConfig`` of a process: one handler
on stderr at ``LOG_LEVEL``, human-readable lines by default, one JSON object per line with
``LOG_FORMAT=json`` (python-json-logger; fields passed as ``extra=`` such as ``task_id``,
``delivery_id``, ``batch_id`` and ``worker`` become keys of that object). ``configure``
applies it; gunicorn applies the same dict through its ``logconfig_dict`` setting, so its
own lines look like ours. ``summary`` describes a configuration for the start-up line
without secrets (a password in ``DATABASE_URL``, ``API_TOKEN``).
"""

from __future__ import annotations

import dataclasses
import logging
import logging.config
import re
import sys
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from taskrunner.config import Config

LEVELS = ("debug", "info", "warning", "error")
# LOG_LEVEL / RUST_LOG spellings that are not Python level names
_ALIASES = {"trace": "debug", "warn": "warning"}
FORMATS = ("text", "json")

TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(process)d %(levelname)s %(name)s %(message)s"
# password=... in a key=value connection string or a URL's query
_PASSWORD_PARAM = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.I)
# Settings a start-up summary never shows as they are.
_SECRET_FIELDS = {"api_token"}


def level_name(config: Config) -> str:
    """The Python level for ``LOG_LEVEL``; ``RUST_LOG``-style ``info,module=debug`` keeps
    its first part. An unknown level stops the process with a message naming it."""
    first = config.log_level.split(",", 1)[0].strip().lower()
    level = _ALIASES.get(first, first)
    if level not in LEVELS:
        raise SystemExit(f"LOG_LEVEL must be one of {', '.join(LEVELS)}, got {config.log_level!r}")
    return level.upper()


def _formatter(config: Config) -> dict[str, Any]:
    if config.log_format == "json":
        return {"()": "pythonjsonlogger.json.JsonFormatter", "fmt": JSON_FIELDS}
    if config.log_format == "text":
        return {"format": TEXT_FORMAT}
    raise SystemExit(f"LOG_FORMAT must be one of {', '.join(FORMATS)}, got {config.log_format!r}")


def dict_config(config: Config) -> dict[str, Any]:
    """Root logs to stderr at ``LOG_LEVEL``; gunicorn's loggers go through it too."""
    level = level_name(config)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"taskrunner": _formatter(config)},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "taskrunner",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level, "handlers": ["stderr"]},
        # gunicorn gives these their own handlers; ours replace them (dictConfig drops
        # a configured logger's handlers) and send their lines to the root handler
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": [], "propagate": True},
            # gunicorn writes access lines whenever a logconfig_dict is set; ours come from
            # taskrunner.api.requestlog (ACCESS_LOG), so its own would double every request
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
        },
    }


_json_lines = False  # LOG_FORMAT=json in this process (configure)


def configure(config: Config) -> None:
    """Configure this process's logging (call once, early, before logging anything)."""
    global _json_lines
    logging.config.dictConfig(dict_config(config))
    _json_lines = config.log_format == "json"


def json_lines() -> bool:
    """Whether this process writes JSON lines (then every line it writes must be one)."""
    return _json_lines


def say(
    message: str,
    *,
    level: int = logging.INFO,
    stream: TextIO | None = None,
    logger: str = "taskrunner.cli",
    **fields: Any,
) -> None:
    """A line for the person at the terminal (``up``'s progress, the supervisor's news):
    printed as it is to ``stream`` (stdout by default), or with ``LOG_FORMAT=json`` a log
    record carrying ``fields``, so that every line of the output is a JSON object."""
    if _json_lines:
        logging.getLogger(logger).log(level, message, extra=fields)
    else:
        print(message, file=stream or sys.stdout, flush=True)


def redact_url(url: str | None) -> str | None:
    """``url`` without its password (``postgresql://u:***@host/db``; in a key=value
    connection string, ``password=***``)."""
    if not url:
        return url
    url = _PASSWORD_PARAM.sub(r"\1***", url)
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if password is None:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def summary(config: Config) -> str:
    """Every setting as ``name=value``, secrets replaced (``set``/``unset``, ``***``)."""
    shown = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in _SECRET_FIELDS:
            value = "set" if value else "unset"
        elif f.name == "database_url":
            value = redact_url(value) or "unset"
        elif isinstance(value, list):
            value = ",".join(value) or "none"
        shown.append(f"{f.name}={value}")
    return " ".join(shown)


def log_start(logger: logging.Logger, what: str, config: Config, **facts: Any) -> None:
    """The start-up line every process writes: what starts, and its configuration."""
    extra = " ".join(f"{k}={v}" for k, v in facts.items())
    logger.info("%s starting%s; %s", what, f" ({extra})" if extra else "", summary(config))
