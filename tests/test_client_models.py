"""The client's typed results agree with the OpenAPI document, field by field, both ways."""

from __future__ import annotations

from typing import Any

import pytest

from taskrunner.api import openapi
from taskrunner.client import models

DOC = openapi.document()


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref:
        return DOC["components"]["schemas"][ref.rsplit("/", 1)[1]]
    for option in schema.get("anyOf", []):  # a nullable object
        if option.get("type") != "null":
            return _resolve(option)
    return schema


def schema_at(path: str) -> dict[str, Any]:
    """``Action.params`` / ``TaskDetail.dependencies[]``: a component or an object in it."""
    name, *steps = path.split(".")
    schema = DOC["components"]["schemas"][name]
    for step in steps:
        schema = _resolve(schema["properties"][step.removesuffix("[]")])
        if step.endswith("[]"):
            schema = _resolve(schema["items"])
    return schema


@pytest.mark.parametrize("model", list(models.SCHEMA_NAMES), ids=lambda m: m.__name__)
def test_fields_are_the_schema_properties(model: type[models.Model]) -> None:
    schema = schema_at(models.SCHEMA_NAMES[model])

    assert set(model.json_names().values()) == set(schema["properties"])


def test_every_response_object_has_a_class() -> None:
    mirrored = {name for name in models.SCHEMA_NAMES.values() if "." not in name}
    answered = set()
    for item in DOC["paths"].values():
        for method, operation in item.items():
            if method == "parameters":
                continue
            for answer in operation["responses"].values():
                schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
                ref = schema.get("$ref") or schema.get("items", {}).get("$ref")
                if ref:
                    answered.add(ref.rsplit("/", 1)[1])

    assert answered - {"Error"} <= mirrored, "a response schema without a client class"
