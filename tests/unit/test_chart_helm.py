"""The helm the chart tests use, and tests of how it is built.

helm is built from the Go module in tools/helm by scripts/build-helm.sh into
``${EVENTRAILS_CACHE:-~/.cache/eventrails}/helm/<version>/bin``. When it is missing and Go
is installed, importing this module builds it once per machine, before any test's timeout
starts. A cold build took about 6 minutes at nice 19 on this project's 2-core machine.
``EVENTRAILS_BUILD_HELM=0`` forbids building.

Without the binary, linting and rendering fall back to the helm-python-sdk package (Helm's
Go SDK as a shared library, on PyPI) when it is installed; ``EVENTRAILS_HELM=sdk`` picks it
even when the binary exists. Tests that need the helm command itself (``helm install`` on
the control plane, ``helm version``) skip without it, and ``-ra`` prints why.

The other chart test modules import ``Helm``, ``HELM``, ``HELM_UNAVAILABLE`` and the
``helm`` fixture from here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "eventrails"
GO_MOD = REPO / "tools" / "helm" / "go.mod"
BUILD_SCRIPT = REPO / "scripts" / "build-helm.sh"
# The Kubernetes version of the test control plane; templates are rendered for it.
KUBE_VERSION = "1.35.4"
# Helm's lint severities, as helm-python-sdk reports them.
_SDK_SEVERITIES = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def pinned_version() -> str:
    """Return the helm.sh/helm/v4 version that tools/helm/go.mod requires."""
    match = re.search(r"^\s*helm\.sh/helm/v4 (v\S+)", GO_MOD.read_text(), re.MULTILINE)
    if match is None:
        raise AssertionError(f"{GO_MOD} has no requirement for helm.sh/helm/v4")
    return match.group(1)


def cache_dir() -> Path:
    cache = Path(os.environ.get("EVENTRAILS_CACHE") or Path.home() / ".cache" / "eventrails")
    return cache / "helm" / pinned_version() / "bin"


def _find_go() -> str | None:
    configured = os.environ.get("GO")
    if configured:
        return configured if shutil.which(configured) else None
    return shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)


def _prepare() -> tuple[Path | None, str | None]:
    """Return (helm binary, None), or (None, the reason the binary is not available)."""
    binary = cache_dir() / "helm"
    if os.access(binary, os.X_OK):
        return binary, None
    missing = f"helm {pinned_version()} is not built ({binary} is missing)"
    go = _find_go()
    if go is None:
        return None, f"{missing} and Go is not installed to build it with {BUILD_SCRIPT}"
    if os.environ.get("EVENTRAILS_BUILD_HELM", "1") == "0":
        return None, f"{missing}; EVENTRAILS_BUILD_HELM=0 forbids building it during the tests"
    # pytest captures output during collection, so the build's progress goes to the real stderr.
    sys.__stderr__.write(f"\nbuilding helm {pinned_version()} for the chart tests (a cold build takes minutes)\n")
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=sys.__stderr__, text=True,
        env=os.environ | {"GO": go}, timeout=3600, check=False,
    )
    if result.returncode != 0:
        return None, f"{BUILD_SCRIPT} failed with exit code {result.returncode}; its output is above"
    return Path(result.stdout.strip().splitlines()[-1]) / "helm", None


def _sdk_module() -> ModuleType | None:
    try:
        import helm_python  # type: ignore[import-not-found]
    except ImportError:
        return None
    return helm_python


HELM, HELM_UNAVAILABLE = _prepare()
_SDK = _sdk_module()
needs_helm = pytest.mark.skipif(HELM is None, reason=HELM_UNAVAILABLE or "")


class HelmError(AssertionError):
    """helm exited with an error; the message carries its output."""


@dataclass
class LintReport:
    """What ``helm lint`` found: (severity, message) pairs, and whether the chart failed."""

    failed: bool
    findings: list[tuple[str, str]] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [f"[{severity}] {message}" for severity, message in self.findings if severity in ("WARNING", "ERROR")]


def _manifests(text: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(text) if document]


class Helm:
    """The helm binary with its caches and configuration in one directory of their own."""

    backend = "binary"

    def __init__(self, binary: Path, home: Path, kubeconfig: Path | None = None) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig
        home.mkdir(parents=True, exist_ok=True)
        self._env = {key: value for key, value in os.environ.items() if not key.startswith("HELM_")}
        self._env.update({
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        })
        self._values_dir = home

    def run(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        command = [str(self.binary), *args]
        if self.kubeconfig is not None:
            command += ["--kubeconfig", str(self.kubeconfig)]
        result = subprocess.run(command, env=self._env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise HelmError(f"helm {' '.join(args)} exited with {result.returncode}:\n{result.stderr}{result.stdout}")
        return result

    def values_file(self, values: dict[str, Any]) -> Path:
        handle, name = tempfile.mkstemp(prefix="values-", suffix=".yaml", dir=self._values_dir)
        with os.fdopen(handle, "w") as file:
            yaml.safe_dump(values, file)
        return Path(name)

    def _value_args(self, values: dict[str, Any] | None) -> list[str]:
        return ["--values", str(self.values_file(values))] if values else []

    def lint(self, values: dict[str, Any] | None = None) -> LintReport:
        result = self.run("lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), *self._value_args(values),
                          check=False)
        findings = re.findall(r"^\[(INFO|WARNING|ERROR)\] (.*)$", result.stdout, re.MULTILINE)
        return LintReport(failed=result.returncode != 0, findings=findings)

    def template(
        self, values: dict[str, Any] | None = None, *, release: str = "eventrails", namespace: str = "eventrails-system",
        include_crds: bool = False,
    ) -> list[dict[str, Any]]:
        """Render the chart and return its manifests (NOTES.txt is not among them)."""
        args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION,
                *self._value_args(values)]
        if include_crds:
            args.append("--include-crds")
        return _manifests(self.run(*args).stdout)

    def template_error(self, values: dict[str, Any]) -> str:
        """Render values that must be rejected, and return helm's error message."""
        result = self.run("template", "eventrails", str(CHART), "--kube-version", KUBE_VERSION,
                          *self._value_args(values), check=False)
        if result.returncode == 0:
            raise AssertionError(f"helm template accepted {values}")
        return result.stderr

    def notes(self, values: dict[str, Any] | None = None, *, release: str = "eventrails",
              namespace: str = "eventrails-system") -> str:
        """Return the NOTES.txt that ``helm install`` prints, without a cluster."""
        result = self.run("install", release, str(CHART), "--dry-run=client", "--namespace", namespace,
                          *self._value_args(values))
        return result.stdout.split("NOTES:", 1)[1]


class SdkHelm:
    """Linting and rendering through helm-python-sdk, for machines without the helm binary."""

    backend = "sdk"

    def __init__(self, module: ModuleType) -> None:
        self._sdk = module

    def lint(self, values: dict[str, Any] | None = None) -> LintReport:
        report = self._sdk.lint(str(CHART), values, strict=True, kube_version=KUBE_VERSION)
        findings = [(_SDK_SEVERITIES.get(item["severity"], "UNKNOWN"), f"{item['path']}: {item['error'].strip()}")
                    for item in report["messages"]]
        return LintReport(failed=bool(report["errors"]), findings=findings)

    def _render(self, values: dict[str, Any] | None, release: str, namespace: str) -> dict[str, str]:
        chart = self._sdk.Chart.load(str(CHART))
        return dict(chart.render(values or {}, name=release, namespace=namespace, is_install=True))

    def template(
        self, values: dict[str, Any] | None = None, *, release: str = "eventrails", namespace: str = "eventrails-system",
        include_crds: bool = False,
    ) -> list[dict[str, Any]]:
        """Render the chart and return its manifests (NOTES.txt is not among them)."""
        files = self._render(values, release, namespace)
        manifests = []
        if include_crds:
            for crd in self._sdk.Chart.load(str(CHART)).crds:
                manifests += _manifests(crd["data"])
        for name in sorted(files):
            if not name.endswith("NOTES.txt"):
                manifests += _manifests(files[name])
        return manifests

    def template_error(self, values: dict[str, Any]) -> str:
        """Render values that must be rejected, and return helm's error message."""
        try:
            self._render(values, "eventrails", "eventrails-system")
        except self._sdk.HelmError as error:
            return str(error)
        raise AssertionError(f"helm-python-sdk rendered {values}")

    def notes(self, values: dict[str, Any] | None = None, *, release: str = "eventrails",
              namespace: str = "eventrails-system") -> str:
        files = self._render(values, release, namespace)
        return next(text for name, text in files.items() if name.endswith("NOTES.txt"))


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm | SdkHelm:
    """The helm binary, else helm-python-sdk, for linting and rendering the chart."""
    if _SDK is not None and (HELM is None or os.environ.get("EVENTRAILS_HELM") == "sdk"):
        return SdkHelm(_SDK)
    if HELM is None:
        pytest.skip(f"{HELM_UNAVAILABLE}; helm-python-sdk is not installed either")
    return Helm(HELM, tmp_path_factory.mktemp("helm-home"))


# --- tests of the tooling itself -----------------------------------------------------------------


@needs_helm
def test_helm_reports_the_pinned_version(tmp_path: Path) -> None:
    assert HELM is not None
    result = Helm(HELM, tmp_path).run("version", "--template", "{{ .Version }}")
    assert result.stdout.strip() == pinned_version()


def test_build_script_is_idempotent() -> None:
    """With the binary in the cache the script builds nothing and names the directory."""
    if HELM is None:
        pytest.skip(HELM_UNAVAILABLE or "helm is not available")
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip().splitlines()[-1] == str(HELM.parent)
    assert f"helm {pinned_version()} already built" in result.stderr


def test_build_script_without_go(tmp_path: Path) -> None:
    """An empty cache and no Go: the script exits non-zero and names the fix."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "EVENTRAILS_CACHE": str(tmp_path / "cache"),
           "GO": str(tmp_path / "no-go")}
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=60, env=env,
                            check=False)
    # GO names a missing file, so the script finds no toolchain to build with.
    assert result.returncode != 0
    assert "Go" in result.stderr and not (tmp_path / "cache" / "helm" / pinned_version() / "bin" / "helm").exists()


@pytest.mark.skipif(HELM is None or _SDK is None, reason="needs both the helm binary and helm-python-sdk")
@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["shop"], "defaultEventBus": {"create": True}}])
def test_sdk_fallback_renders_like_helm(tmp_path: Path, values: dict[str, Any]) -> None:
    assert HELM is not None and _SDK is not None

    def key(manifest: dict[str, Any]) -> tuple[str, str, str]:
        return manifest["kind"], manifest["metadata"].get("namespace", ""), manifest["metadata"]["name"]

    binary = sorted(Helm(HELM, tmp_path).template(values, include_crds=True), key=key)
    sdk = sorted(SdkHelm(_SDK).template(values, include_crds=True), key=key)
    assert [key(item) for item in sdk] == [key(item) for item in binary]
    assert sdk == binary
