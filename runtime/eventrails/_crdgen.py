"""Render the CustomResourceDefinitions from the pydantic models in ``_resources``.

Run ``eventrails crds --output crds/`` after changing a model; a test fails while the
files in the repository differ from what this module renders.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from eventrails._resources import GROUP, KINDS, NAME_MAX_LENGTH, NAME_PATTERN, VERSION, KindInfo

# Keywords pydantic emits that a structural CRD schema rejects or does not need.
_DROPPED_KEYS = {"title", "$defs", "discriminator"}


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """Replace ``$ref`` with the referenced definition and make the schema structural."""
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema

    if "$ref" in schema:
        target = copy.deepcopy(defs[schema["$ref"].split("/")[-1]])
        extra = {key: value for key, value in schema.items() if key != "$ref"}
        target.update(extra)
        return _inline(target, defs)

    # Optional fields arrive as anyOf [X, null]; the CRD expresses optional by omission.
    if "anyOf" in schema:
        options = [option for option in schema["anyOf"] if option.get("type") != "null"]
        if len(options) == 1:
            merged = {key: value for key, value in schema.items() if key != "anyOf"}
            inner = _inline(options[0], defs)
            inner.update({key: value for key, value in merged.items() if key not in ("default",)})
            if merged.get("default") is not None:
                inner["default"] = merged["default"]
            return _inline(inner, defs)

    result: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "properties":
            result[key] = {name: _inline(child, defs) for name, child in value.items()}
        elif key == "additionalProperties":
            # Structural schemas forbid 'additionalProperties: false' (pruning does that job)
            # and 'true' is spelled x-kubernetes-preserve-unknown-fields.
            if isinstance(value, dict):
                result[key] = _inline(value, defs)
        else:
            result[key] = _inline(value, defs)
    if schema.get("additionalProperties") is True and "x-kubernetes-preserve-unknown-fields" not in result:
        result["x-kubernetes-preserve-unknown-fields"] = True
    if result.get("type") == "object" and result.get("x-kubernetes-preserve-unknown-fields"):
        result.pop("additionalProperties", None)
    return result


def openapi_schema(model: type[Any]) -> dict[str, Any]:
    """Return the structural OpenAPI v3 schema of one pydantic model, as a CRD embeds it."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    return _inline(raw, defs)


def render_crd(info: KindInfo) -> dict[str, Any]:
    """Return the CustomResourceDefinition of one kind as a plain dict."""
    spec_schema = openapi_schema(info.spec)
    spec_schema["description"] = (info.spec.__doc__ or "").strip()
    status_schema = openapi_schema(info.status)
    status_schema["description"] = (info.status.__doc__ or "").strip()
    root = {
        "type": "object",
        "description": info.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "eventrails.dev/v1alpha1"},
            "kind": {"type": "string", "description": info.kind},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.matches('{NAME_PATTERN}') && size(self.metadata.name) <= {NAME_MAX_LENGTH}",
                "message": "metadata.name must be a DNS label (lowercase letters, digits and '-', at most 63 "
                "characters) because it becomes part of JetStream names",
            }
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{info.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "eventrails"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": info.short_names,
                "categories": ["eventrails"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": info.printer_columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render_files() -> dict[str, str]:
    """Return the CRD YAML files by file name, one kind per file."""
    files: dict[str, str] = {}
    for info in KINDS.values():
        text = yaml.safe_dump(render_crd(info), sort_keys=False, width=120)
        files[f"{info.plural}.{GROUP}.yaml"] = "# Generated by `eventrails crds`; edit runtime/eventrails/_resources.py.\n" + text
    return files


def write_files(directory: Path) -> list[Path]:
    """Write the CRD files into ``directory`` and return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_files().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
