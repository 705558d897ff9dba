"""charts/eventrails lints, renders in both RBAC modes, and every manifest is valid.

kubernetes-validate checks built-in kinds in strict mode (unknown fields fail), against the
schemas of the test control plane's Kubernetes version. The chart's own custom resources
(EventBus, kopf peering objects) are checked against the openAPIV3Schema of their CRDs in
the chart's crds/, made strict the same way. Prometheus Operator kinds have no schema here,
so their wiring to the Service and pods is checked instead.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from eventrails_operator._settings import OperatorSettings
from tests.unit.test_chart_helm import CHART, KUBE_VERSION, Helm, helm  # noqa: F401 - fixture

CLUSTER: dict[str, Any] = {}
NAMESPACED: dict[str, Any] = {"watchNamespaces": ["shop", "billing"]}
# Every optional object switched on, to validate them too.
EVERYTHING: dict[str, Any] = {
    "replicaCount": 2,
    "defaultEventBus": {"create": True, "credentials": {"secretName": "nats-creds", "kind": "creds"},
                        "tlsSecret": "nats-tls"},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                "workerPodMonitor": {"enabled": True}},
    "grafanaDashboard": {"enabled": True},
    "operator": {"env": {"WORKER_LIMIT": 128, "EVENT_LEVEL": "warning"}},
}
MODES = {
    "cluster": CLUSTER,
    "namespaced": NAMESPACED,
    "cluster-everything": EVERYTHING,
    "namespaced-everything": {**EVERYTHING, **NAMESPACED},
}
# Kinds from CRDs that no schema in this environment describes.
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor"}


def _strict(schema: Any) -> Any:
    """A copy of a structural schema that rejects unknown fields, as strict field validation does."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: _strict(value) for key, value in schema.items() if not key.startswith("x-kubernetes-")}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in schema:
        result["additionalProperties"] = False
    return result


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) to the strict schema of everything but metadata, from the chart's crds/."""
    schemas = {}
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            for version in crd["spec"]["versions"]:
                schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                schema.setdefault("properties", {}).update(
                    {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
                )
                schemas[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = schema
    return schemas


CRD_SCHEMAS = _crd_schemas()


def validate(manifest: dict[str, Any]) -> None:
    """Raise when the manifest is not valid for its kind."""
    key = (manifest["apiVersion"], manifest["kind"])
    if key in CRD_SCHEMAS:
        jsonschema.Draft7Validator(CRD_SCHEMAS[key]).validate(manifest)
    elif manifest["kind"] in MONITORING_KINDS:
        assert manifest["apiVersion"] == "monitoring.coreos.com/v1", manifest["apiVersion"]
    else:
        kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [item for item in manifests if item["kind"] == kind]


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, found {[item['metadata']['name'] for item in found]}"
    return found[0]


def operator_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]


# --- lint and validity ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
def test_helm_lint_passes(helm: Helm, mode: str) -> None:
    report = helm.lint(MODES[mode])
    assert not report.failed, report.findings
    assert report.problems == []


def test_helm_lint_reports_bad_values(helm: Helm) -> None:
    report = helm.lint({"operator": {"logLevel": "verbose"}})
    assert report.failed
    assert any("/operator/logLevel" in problem for problem in report.problems), report.problems


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_rendered_manifest_validates(helm: Helm, mode: str) -> None:
    manifests = helm.template(MODES[mode], include_crds=True)
    kinds = {item["kind"] for item in manifests}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "Service"} <= kinds
    for manifest in manifests:
        try:
            validate(manifest)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as error:
            raise AssertionError(f"{manifest['kind']} {manifest['metadata']['name']}: {error.message}") from None


def test_validation_rejects_an_unknown_field(helm: Helm) -> None:
    """The checks above can fail: a misspelt field in a built-in kind or an EventBus is caught."""
    manifests = helm.template(EVERYTHING)
    deployment = copy.deepcopy(one(manifests, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    bus = copy.deepcopy(by_kind(manifests, "EventBus")[0])
    bus["spec"]["server"] = ["nats://typo:4222"]
    with pytest.raises(jsonschema.ValidationError):
        validate(bus)


def test_chart_crds_include_kopf_peering(helm: Helm) -> None:
    manifests = helm.template(include_crds=True)
    names = sorted(item["metadata"]["name"] for item in by_kind(manifests, "CustomResourceDefinition"))
    assert names == ["clusterkopfpeerings.kopf.dev", "consumers.eventrails.dev", "eventbuses.eventrails.dev",
                     "kopfpeerings.kopf.dev", "topics.eventrails.dev"]


# --- the operator Deployment ----------------------------------------------------------------------


def test_operator_pod_is_locked_down(helm: Helm) -> None:
    deployment = one(helm.template(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # The read-only root filesystem keeps a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_probes_hit_health_endpoint(helm: Helm) -> None:
    container = operator_container(helm.template({"operator": {"healthPort": 8181, "metricsPort": 9191}}))
    env = {item["name"]: item.get("value") for item in container["env"]}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    settings = OperatorSettings.model_validate(
        {key.removeprefix("EVENTRAILS_OPERATOR_").lower(): value for key, value in env.items()
         if key.startswith("EVENTRAILS_OPERATOR_")}
    )
    # The liveness endpoint the operator serves is where every probe points.
    assert settings.liveness_endpoint == "http://0.0.0.0:8181/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        action = container[probe]["httpGet"]
        assert action["path"] == "/healthz" and ports[action["port"]] == 8181, (probe, action)
    assert settings.metrics_port == ports["metrics"] == 9191


def test_settings_from_values_reach_the_operator(helm: Helm) -> None:
    """Each setting the chart renders is a real OperatorSettings field, with the value from values.yaml."""
    values = {
        "watchNamespaces": ["shop", "billing"],
        "nats": {"servers": ["nats://a.nats:4222", "nats://b.nats:4222"], "subjectPrefix": "acme.rails"},
        "operator": {"resyncInterval": 15, "logLevel": "debug", "logFormat": "json", "keda": "off",
                     "workerImage": {"repository": "registry.example/worker", "tag": "2.0"},
                     "env": {"worker_limit": 128, "EVENT_LEVEL": "warning"}},
        "peering": {"name": "rails", "lifetime": 30},
    }
    container = operator_container(helm.template(values))
    assert container["command"] == ["eventrails", "operator"]
    assert container["args"] == ["--namespace=shop", "--namespace=billing", "--log-level=debug"]

    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["EVENTRAILS_LOG_FORMAT"] == "json"
    operator_env = {key.removeprefix("EVENTRAILS_OPERATOR_").lower(): value for key, value in env.items()
                    if key.startswith("EVENTRAILS_OPERATOR_")}
    unknown = set(operator_env) - set(OperatorSettings.model_fields)
    assert not unknown, f"the chart sets variables the operator does not read: {sorted(unknown)}"
    settings = OperatorSettings.model_validate(operator_env)
    assert settings.default_nats_servers == ["nats://a.nats:4222", "nats://b.nats:4222"]
    assert settings.default_subject_prefix == "acme.rails"
    assert settings.resync_interval == 15
    assert settings.keda == "off"
    assert settings.worker_image == "registry.example/worker:2.0"
    assert settings.peering_name == "rails" and settings.peering_lifetime == 30
    assert settings.worker_limit == 128 and settings.event_level == "warning"
    # kopf names the replica in the peering object after its pod.
    pod_id = next(item for item in container["env"] if item["name"] == "POD_ID")
    assert pod_id["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_default_worker_image_matches_the_chart(helm: Helm) -> None:
    container = operator_container(helm.template())
    env = {item["name"]: item.get("value") for item in container["env"]}

    assert OperatorSettings().worker_image == env["EVENTRAILS_OPERATOR_WORKER_IMAGE"]


def test_peering_object_matches_the_mode(helm: Helm) -> None:
    cluster = helm.template()
    peering = one(cluster, "ClusterKopfPeering")
    env = {item["name"]: item.get("value") for item in operator_container(cluster)["env"]}
    assert env["EVENTRAILS_OPERATOR_PEERING_NAME"] == peering["metadata"]["name"]

    namespaced = helm.template(NAMESPACED)
    assert not by_kind(namespaced, "ClusterKopfPeering")
    assert sorted(item["metadata"]["namespace"] for item in by_kind(namespaced, "KopfPeering")) == ["billing", "shop"]

    standalone = helm.template({"peering": {"enabled": False}})
    assert not by_kind(standalone, "ClusterKopfPeering")
    assert "EVENTRAILS_OPERATOR_PEERING_NAME" not in {item["name"] for item in operator_container(standalone)["env"]}


def test_replicas_without_peering_are_refused(helm: Helm) -> None:
    error = helm.template_error({"replicaCount": 2, "peering": {"enabled": False}})
    assert "replicaCount above 1 needs peering.enabled" in error


def test_disruption_budget_only_for_several_replicas(helm: Helm) -> None:
    assert not by_kind(helm.template(), "PodDisruptionBudget")
    budget = one(helm.template({"replicaCount": 3}), "PodDisruptionBudget")
    deployment = one(helm.template({"replicaCount": 3}), "Deployment")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]


# --- values checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "named"), [
    ({"watchNamespaces": ["Shop"]}, "watchNamespaces"),
    ({"nats": {"servers": ["http://nats:4222"]}}, "nats.servers"),
    ({"operator": {"logLevel": "verbose"}}, "operator.logLevel"),
    ({"operator": {"resyncInterval": 0}}, "operator.resyncInterval"),
    ({"operator": {"keda": "on"}}, "operator.keda"),
    ({"defaultEventBus": {"credentials": {"secretName": "creds"}}}, "defaultEventBus.credentials"),
    ({"replicas": 2}, "replicas"),
])
def test_schema_rejects_bad_values_naming_them(helm: Helm, values: dict[str, Any], named: str) -> None:
    error = helm.template_error(values)
    assert "values don't meet the specifications of the schema" in error, error
    # helm names the offending key path, such as /operator/logLevel.
    assert "/" + named.replace(".", "/") in error or named.split(".")[-1] in error, error


def test_values_file_documents_every_key() -> None:
    """Each key of values.yaml has a comment above it, and the schema describes it."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()

    def walk(node: yaml.MappingNode, described: dict[str, Any], path: str) -> None:
        for key_node, value_node in node.value:
            key = key_node.value
            where = f"{path}.{key}" if path else key
            assert key in described.get("properties", {}), f"values.schema.json has no {where}"
            child = described["properties"][key]
            assert child.get("description"), f"values.schema.json does not describe {where}"
            above = lines[key_node.start_mark.line - 1].strip()
            assert above.startswith("#"), f"values.yaml line {key_node.start_mark.line + 1} ({where}) has no comment"
            # Free-form values (resources, security contexts, label maps) are documented as a whole.
            if isinstance(value_node, yaml.MappingNode) and child.get("additionalProperties") is False:
                walk(value_node, child, where)

    root = yaml.compose(text)
    assert isinstance(root, yaml.MappingNode)
    walk(root, schema, "")


# --- optional objects -----------------------------------------------------------------------------


def test_default_event_bus_from_values(helm: Helm) -> None:
    values = {"defaultEventBus": {"create": True, "credentials": {"secretName": "nats-creds", "kind": "nkey"}},
              "nats": {"servers": ["nats://nats.nats:4222"], "subjectPrefix": "acme"}}
    cluster = by_kind(helm.template(values, namespace="ops"), "EventBus")
    assert [(bus["metadata"]["namespace"], bus["metadata"]["name"]) for bus in cluster] == [("ops", "default")]
    assert cluster[0]["spec"] == {"servers": ["nats://nats.nats:4222"], "subjectPrefix": "acme",
                                  "credentials": {"secretName": "nats-creds", "kind": "nkey"}}

    namespaced = by_kind(helm.template({**values, **NAMESPACED}), "EventBus")
    assert sorted(bus["metadata"]["namespace"] for bus in namespaced) == ["billing", "shop"]
    assert not by_kind(helm.template(), "EventBus")


def test_monitors_select_service_and_workers(helm: Helm) -> None:
    manifests = helm.template(EVERYTHING)
    service = one(manifests, "Service")
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {port["name"] for port in service["spec"]["ports"]}
    pod_labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()

    # The worker PodMonitor selects what the operator puts on worker pods.
    from eventrails._resources import Consumer
    from eventrails_operator._desired import worker_labels

    consumer = Consumer.model_validate({
        "apiVersion": "eventrails.dev/v1alpha1", "kind": "Consumer", "metadata": {"name": "mailer", "namespace": "shop"},
        "spec": {"topic": "mail", "handler": "mail.handlers:worker"},
    })
    workers = one(manifests, "PodMonitor")
    assert workers["spec"]["selector"]["matchLabels"].items() <= worker_labels(consumer).items()
    assert workers["spec"]["podMetricsEndpoints"][0]["port"] == "http"


def test_dashboard_config_map_content(helm: Helm) -> None:
    config_map = one(helm.template({"grafanaDashboard": {"enabled": True}}), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["eventrails.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "eventrails.json").read_text())


def test_notes_tell_the_next_command(helm: Helm) -> None:
    notes = helm.notes({"watchNamespaces": ["shop"]}, release="demo", namespace="ops")
    assert "kubectl --namespace ops rollout status deployment/demo-eventrails" in notes
    assert "kubectl wait --namespace shop --for=condition=Ready topic/mail" in notes
    assert "It watches the namespaces: shop." in notes
