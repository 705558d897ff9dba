"""Load and validate eventrails manifests, with errors that name the field, the value and the rule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import yaml

from eventrails._durations import DURATION_PATTERN
from eventrails._resources import (
    API_VERSION,
    EVENT_NAME_PATTERN,
    HANDLER_PATTERN,
    KINDS,
    NAME_PATTERN,
    TASK_NAME_PATTERN,
    Resource,
)

# Plain-language names for the patterns, so an error says what the value should look like.
_PATTERN_HINTS = {
    TASK_NAME_PATTERN: "lower-kebab-case, such as 'send-email'",
    EVENT_NAME_PATTERN: "PascalCase, such as 'InvoicePaid'",
    HANDLER_PATTERN: "'module:object', such as 'billing.workers:worker'",
    DURATION_PATTERN: "a duration with a unit of ms, s, m, h or d, such as '30s' or '1h30m'",
    NAME_PATTERN: "a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit",
}


class ManifestError(ValueError):
    """A manifest that cannot be used; ``reference`` says which document and object it is."""

    def __init__(self, reference: str, problems: list[str]) -> None:
        self.reference = reference
        self.problems = problems
        super().__init__(f"{reference}: " + "; ".join(problems))


@dataclass(frozen=True)
class Document:
    """One YAML document and where it came from."""

    source: str
    body: dict[str, Any]


def _field_path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith(("function-after", "function-before", "function-wrap")) or part in ("str", "int"):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path


def _describe(error: Any) -> str:
    location = _field_path(tuple(error["loc"]))
    value = error.get("input")
    context = error.get("ctx") or {}
    kind = error["type"]

    if kind == "missing":
        return f"{location}: required field is missing"
    if kind == "extra_forbidden":
        return f"{location}: unknown field; check its spelling against `kubectl explain`"
    if kind == "string_pattern_mismatch":
        pattern = context.get("pattern", "")
        hint = _PATTERN_HINTS.get(pattern, f"pattern {pattern}")
        return f"{location}: {value!r} is invalid: must be {hint}"
    if kind == "enum":
        return f"{location}: {value!r} is invalid: must be one of {context.get('expected')}"
    if kind == "literal_error":
        return f"{location}: {value!r} is invalid: must be {context.get('expected')}"
    if kind == "value_error":
        message = str(context.get("error", error["msg"]))
        return f"{location}: {message}" if location else message
    shown = f"{value!r} is invalid: " if not isinstance(value, dict) else ""
    return f"{location}: {shown}{error['msg']}"


def _reference(body: dict[str, Any], source: str) -> str:
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    kind = body.get("kind", "?")
    name = metadata.get("name", "?")
    namespace = metadata.get("namespace", "default")
    return f"{source}: {kind} {namespace}/{name}"


def parse_resource(body: dict[str, Any], source: str = "<manifest>", default_namespace: str = "default") -> Resource:
    """Validate one manifest body and return its model.

    Raises ManifestError listing every problem with its field path, value and rule.
    """
    body = dict(body)
    metadata = dict(body.get("metadata") or {})
    metadata.setdefault("namespace", default_namespace)
    body["metadata"] = metadata
    reference = _reference(body, source)

    if body.get("apiVersion") != API_VERSION:
        raise ManifestError(reference, [f"apiVersion: {body.get('apiVersion')!r} is invalid: must be {API_VERSION!r}"])
    info = KINDS.get(str(body.get("kind")))
    if info is None:
        raise ManifestError(reference, [f"kind: {body.get('kind')!r} is invalid: must be one of {sorted(KINDS)}"])
    try:
        return info.model.model_validate(body)  # type: ignore[return-value]
    except pydantic.ValidationError as error:
        raise ManifestError(reference, [_describe(item) for item in error.errors()]) from None


def read_documents(paths: list[Path]) -> list[Document]:
    """Read every YAML document from the files and directories given, in a stable order.

    Documents of other API groups (a Deployment next to the Topics, say) are skipped.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")))
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"manifest path {str(path)!r} not found")
    documents: list[Document] = []
    for file in files:
        try:
            loaded = list(yaml.safe_load_all(file.read_text()))
        except yaml.YAMLError as error:
            raise ManifestError(str(file), [f"invalid YAML: {error}"]) from None
        for index, body in enumerate(loaded):
            if not isinstance(body, dict):
                continue
            if str(body.get("apiVersion", "")).split("/")[0] != API_VERSION.split("/")[0]:
                continue
            documents.append(Document(source=f"{file}#{index + 1}" if len(loaded) > 1 else str(file), body=body))
    return documents


def load_resources(paths: list[Path], default_namespace: str = "default") -> tuple[list[Resource], list[ManifestError]]:
    """Parse every eventrails manifest under ``paths``; invalid ones are returned as errors, not raised."""
    resources: list[Resource] = []
    errors: list[ManifestError] = []
    for document in read_documents(paths):
        try:
            resources.append(parse_resource(document.body, document.source, default_namespace))
        except ManifestError as error:
            errors.append(error)
    return resources, errors
