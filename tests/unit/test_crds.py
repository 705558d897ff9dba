"""The CRD files in crds/ and the pydantic models must agree."""

from pathlib import Path

import pytest
import yaml

from eventrails._crdgen import render_crd, render_files
from eventrails._resources import KINDS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("file_name", sorted(render_files()))
def test_crd_file_matches_models(file_name: str) -> None:
    committed = ROOT / "crds" / file_name
    assert committed.exists(), f"{committed} is missing: run `make crds`"
    assert committed.read_text() == render_files()[file_name], f"{committed} is stale: run `make crds`"


def _walk(schema: dict, path: str = "") -> list[tuple[str, dict]]:
    found = [(path, schema)]
    for name, child in schema.get("properties", {}).items():
        found.extend(_walk(child, f"{path}.{name}"))
    if isinstance(schema.get("items"), dict):
        found.extend(_walk(schema["items"], f"{path}[]"))
    if isinstance(schema.get("additionalProperties"), dict):
        found.extend(_walk(schema["additionalProperties"], f"{path}{{}}"))
    return found


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_crd_schema_is_structural(kind: str) -> None:
    schema = render_crd(KINDS[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node, f"{kind}{path} keeps a $ref"
        assert "anyOf" not in node, f"{kind}{path} keeps anyOf"
        assert node.get("additionalProperties") is not False, f"{kind}{path} sets additionalProperties: false"
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            assert "type" in node, f"{kind}{path} has no type"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_spec_field_is_described(kind: str) -> None:
    spec = render_crd(KINDS[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for path, node in _walk(spec):
        if path and not path.endswith("[]") and not path.endswith("{}"):
            assert node.get("description"), f"{kind}.spec{path} has no description for `kubectl explain`"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_crd_has_status_and_printer_columns(kind: str) -> None:
    version = render_crd(KINDS[kind])["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [column["name"] for column in version["additionalPrinterColumns"]]
    assert columns[0] == "Ready"
    assert "Age" in columns


def test_spec_fields_match_model_aliases() -> None:
    for info in KINDS.values():
        spec = render_crd(info)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        aliases = {field.alias or name for name, field in info.spec.model_fields.items()}
        assert set(spec["properties"]) == aliases, info.kind


def test_crd_yaml_parses_to_rendered_dict() -> None:
    for info in KINDS.values():
        text = render_files()[f"{info.plural}.eventrails.dev.yaml"]
        assert yaml.safe_load(text) == render_crd(info)


CHART_CRDS = ROOT / "charts" / "eventrails" / "crds"
PEERING_CRDS = ROOT / "operator" / "eventrails_operator" / "peering.yaml"
# The chart installs kopf's peering CRDs beside the eventrails ones, as this file.
CHART_PEERING_FILE = "kopf-peering.yaml"


@pytest.mark.parametrize("file_name", sorted(render_files()))
def test_chart_crds_are_copies_of_crds_dir(file_name: str) -> None:
    copy = CHART_CRDS / file_name
    assert copy.exists(), f"{copy} is missing: run `make crds`"
    assert copy.read_text() == (ROOT / "crds" / file_name).read_text(), f"{copy} differs from crds/: run `make crds`"


def test_chart_ships_the_operator_peering_crds() -> None:
    copy = CHART_CRDS / CHART_PEERING_FILE
    assert copy.read_text() == PEERING_CRDS.read_text(), f"{copy} differs from {PEERING_CRDS}: run `make crds`"


def test_chart_crds_dir_has_nothing_else() -> None:
    names = {path.name for path in CHART_CRDS.iterdir()}
    assert names == set(render_files()) | {CHART_PEERING_FILE}
