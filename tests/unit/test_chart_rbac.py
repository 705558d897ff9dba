"""The chart's RBAC: least privilege, no wildcards, and every request the operator makes granted.

The operator's own requests are read from its Kubernetes adapter calls (``kube.get(_kube.X``
and so on in operator/eventrails_operator), so a new call without a matching rule fails here
before it fails in a cluster. tests/e2e/test_chart.py runs the operator with these
permissions against a real API server.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from eventrails_operator import _kube
from tests.unit.test_chart_helm import REPO, Helm, helm  # noqa: F401 - fixture

OPERATOR = REPO / "operator" / "eventrails_operator"
ROLE_KINDS = ("Role", "ClusterRole")
# Adapter methods of _kube.KubeApi and the verb each one needs.
METHOD_VERBS = {"get": "get", "create": "create", "merge_patch": "patch", "json_patch": "patch", "delete": "delete"}
# Verbs that would let the operator grant itself more than these rules.
DANGEROUS_VERBS = {"escalate", "bind", "impersonate", "*"}
CRD_KINDS = ("eventbuses", "topics", "consumers")

MODES = {"cluster": {}, "namespaced": {"watchNamespaces": ["shop", "billing"]}}


def roles(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [item for item in manifests if item["kind"] in ROLE_KINDS]


def grants(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(group in rule.get("apiGroups", []) and resource in rule.get("resources", []) and verb in rule["verbs"]
               for rule in rules)


def adapter_calls() -> set[tuple[str, str]]:
    """(verb, resource constant) for each ``kube.<method>(_kube.<RESOURCE>`` call in the operator."""
    calls = set()
    pattern = re.compile(r"kube\.(get|create|merge_patch|json_patch|delete)\(\s*_kube\.([A-Z_]+)")
    for path in sorted(OPERATOR.glob("*.py")):
        for method, constant in pattern.findall(path.read_text()):
            calls.add((METHOD_VERBS[method], constant))
    return calls


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rules_have_no_wildcards(helm: Helm, mode: str) -> None:
    found = roles(helm.template(MODES[mode]))
    assert found
    for role in found:
        for rule in role["rules"]:
            where = f"{role['kind']} {role['metadata']['name']} rule {rule}"
            for key in ("apiGroups", "resources", "verbs"):
                assert not any("*" in value for value in rule.get(key, [])), f"wildcard in {where}"
            assert not set(rule["verbs"]) & DANGEROUS_VERBS, where
            assert "nonResourceURLs" not in rule and "resourceNames" not in rule, where
            # No access to RBAC itself, namespaces or any kind the operator does not handle.
            assert not {"roles", "clusterroles", "rolebindings", "clusterrolebindings", "namespaces", "pods",
                        "serviceaccounts", "configmaps"} & set(rule.get("resources", [])), where


@pytest.mark.parametrize("mode", sorted(MODES))
def test_operator_requests_are_granted(helm: Helm, mode: str) -> None:
    calls = adapter_calls()
    # The scan finds the adapter's real call sites (guards against a regex that matches nothing).
    assert ("get", "SECRETS") in calls and ("create", "DEPLOYMENTS") in calls, calls
    for role in roles(helm.template(MODES[mode])):
        rules = role["rules"]
        for verb, constant in sorted(calls):
            resource: _kube.Resource = getattr(_kube, constant)
            assert grants(rules, resource.group, resource.plural, verb), f"{role['kind']} lacks {verb} {resource}"
        # kopf: watch the custom resources, patch finalizers and annotations, post Events.
        for plural in CRD_KINDS:
            for verb in ("get", "list", "watch", "patch"):
                assert grants(rules, "eventrails.dev", plural, verb), f"{role['kind']} lacks {verb} {plural}"
            # The handlers write status through the status subresource.
            assert grants(rules, "eventrails.dev", f"{plural}/status", "patch")
        assert grants(rules, "", "events", "create")


def test_secrets_get_only(helm: Helm) -> None:
    for mode in MODES.values():
        for role in roles(helm.template(mode)):
            secret_verbs = {verb for rule in role["rules"] if "secrets" in rule.get("resources", [])
                            for verb in rule["verbs"]}
            assert secret_verbs == {"get"}, (role["kind"], secret_verbs)


def test_namespaced_mode_grants_nothing_cluster_wide(helm: Helm) -> None:
    manifests = helm.template(MODES["namespaced"], namespace="ops")
    kinds = {item["kind"] for item in manifests}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}, kinds

    role_namespaces = sorted(item["metadata"]["namespace"] for item in manifests if item["kind"] == "Role")
    assert role_namespaces == ["billing", "shop"]
    account = next(item for item in manifests if item["kind"] == "ServiceAccount")["metadata"]
    for binding in (item for item in manifests if item["kind"] == "RoleBinding"):
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": binding["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"], "namespace": "ops"}]
    # Peering happens in each watched namespace.
    for role in (item for item in manifests if item["kind"] == "Role"):
        assert grants(role["rules"], "kopf.dev", "kopfpeerings", "patch")
        assert not grants(role["rules"], "kopf.dev", "clusterkopfpeerings", "get")


def test_cluster_mode_binds_one_cluster_role(helm: Helm) -> None:
    manifests = helm.template(namespace="ops")
    assert {item["kind"] for item in manifests} & {"Role", "RoleBinding"} == set()
    role = next(item for item in manifests if item["kind"] == "ClusterRole")
    binding = next(item for item in manifests if item["kind"] == "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["namespace"] == "ops"
    assert grants(role["rules"], "kopf.dev", "clusterkopfpeerings", "patch")
    assert not grants(role["rules"], "kopf.dev", "kopfpeerings", "get")


def test_switches_remove_rules(helm: Helm) -> None:
    without_keda = roles(helm.template({"operator": {"keda": "off"}}))[0]["rules"]
    assert not any("keda.sh" in rule.get("apiGroups", []) for rule in without_keda)
    without_peering = roles(helm.template({"peering": {"enabled": False}}))[0]["rules"]
    assert not any("kopf.dev" in rule.get("apiGroups", []) for rule in without_peering)
    assert roles(helm.template({"rbac": {"create": False}})) == []


def test_existing_service_account_needs_a_name(helm: Helm) -> None:
    error = helm.template_error({"serviceAccount": {"create": False}})
    assert "serviceAccount.name is required when serviceAccount.create is false" in error
    manifests = helm.template({"serviceAccount": {"create": False, "name": "platform-operator"}})
    assert not [item for item in manifests if item["kind"] == "ServiceAccount"]
    binding = next(item for item in manifests if item["kind"] == "ClusterRoleBinding")
    assert binding["subjects"][0]["name"] == "platform-operator"


def test_rules_carry_comments() -> None:
    """Each rule in the shared rule list carries a comment that says why it is there."""
    text = (REPO / "charts" / "eventrails" / "templates" / "_helpers.tpl").read_text()
    block = text.split('define "eventrails.namespacedRules"', 1)[1]
    lines = [line for line in block.splitlines() if line.strip()]
    for number, line in enumerate(lines):
        if line.startswith("- apiGroups"):
            previous = lines[number - 1].strip()
            assert previous.startswith("#") or previous.startswith("{{- if"), f"rule without a comment: {line}"
