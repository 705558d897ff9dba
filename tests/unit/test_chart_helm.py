"""The helm command the chart tests use, and tests of how it is built.

helm is built from the Go module in tools/helm by scripts/build-helm.sh into
``${EVENTRAILS_CACHE:-~/.cache/eventrails}/helm/<version>/bin``. When it is missing and Go
is installed, importing this module builds it (once per machine; a cold build takes a few
minutes at nice 19), before any test's timeout starts. ``EVENTRAILS_BUILD_HELM=0`` forbids
that; without Go the chart tests skip and ``-ra`` prints why.

The other chart test modules import ``Helm``, ``HELM`` and ``HELM_UNAVAILABLE`` from here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "eventrails"
GO_MOD = REPO / "tools" / "helm" / "go.mod"
BUILD_SCRIPT = REPO / "scripts" / "build-helm.sh"
# The Kubernetes version of the test control plane; templates are rendered for it.
KUBE_VERSION = "1.35.4"


def pinned_version() -> str:
    """The helm.sh/helm/v4 version that tools/helm/go.mod requires."""
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
    """Return (helm binary, None), or (None, why the chart tests cannot run)."""
    binary = cache_dir() / "helm"
    if os.access(binary, os.X_OK):
        return binary, None
    missing = f"helm {pinned_version()} is not built ({binary} is missing)"
    go = _find_go()
    if go is None:
        return None, f"{missing} and Go is not installed to build it with {BUILD_SCRIPT}"
    if os.environ.get("EVENTRAILS_BUILD_HELM", "1") == "0":
        return None, f"{missing}; EVENTRAILS_BUILD_HELM=0 forbids building it during the tests"
    # pytest captures output during collection; the build's progress goes to the real stderr.
    sys.__stderr__.write(f"\nbuilding helm {pinned_version()} for the chart tests (a cold build takes minutes)\n")
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=sys.__stderr__, text=True,
        env=os.environ | {"GO": go}, timeout=3600, check=False,
    )
    if result.returncode != 0:
        return None, f"{BUILD_SCRIPT} failed with exit code {result.returncode}; its output is above"
    return Path(result.stdout.strip().splitlines()[-1]) / "helm", None


HELM, HELM_UNAVAILABLE = _prepare()
needs_helm = pytest.mark.skipif(HELM is None, reason=HELM_UNAVAILABLE or "")


class HelmError(AssertionError):
    """helm exited with an error; the message carries its stderr."""


class Helm:
    """The helm binary with its caches and configuration in one directory of their own."""

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

    def lint(self, values: dict[str, Any] | None = None, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), *self._value_args(values),
                        check=check)

    def template(
        self, values: dict[str, Any] | None = None, *, release: str = "eventrails", namespace: str = "eventrails-system",
        include_crds: bool = False, check: bool = True,
    ) -> list[dict[str, Any]]:
        """Render the chart and return its manifests (NOTES.txt is not among them)."""
        args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION,
                *self._value_args(values)]
        if include_crds:
            args.append("--include-crds")
        result = self.run(*args, check=check)
        return [document for document in yaml.safe_load_all(result.stdout) if document]

    def template_error(self, values: dict[str, Any]) -> str:
        """Render values that must be rejected; return helm's error message."""
        result = self.run("template", "eventrails", str(CHART), "--kube-version", KUBE_VERSION,
                          *self._value_args(values), check=False)
        if result.returncode == 0:
            raise AssertionError(f"helm template accepted {values}")
        return result.stderr


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    if HELM is None:
        pytest.skip(HELM_UNAVAILABLE or "helm is not available")
    return Helm(HELM, tmp_path_factory.mktemp("helm-home"))


# --- tests of the tooling itself -----------------------------------------------------------------


@needs_helm
def test_helm_reports_the_pinned_version(helm: Helm) -> None:
    result = helm.run("version", "--template", "{{ .Version }}")
    assert result.stdout.strip() == pinned_version()


def test_build_script_reads_the_pinned_version_and_is_idempotent() -> None:
    """With the binary in the cache the script builds nothing and names the directory."""
    if HELM is None:
        pytest.skip(HELM_UNAVAILABLE or "helm is not available")
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip().splitlines()[-1] == str(HELM.parent)
    assert f"helm {pinned_version()} already built" in result.stderr


def test_build_script_without_go_says_what_to_install(tmp_path: Path) -> None:
    """An empty cache and no Go: the script exits non-zero and names the fix."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "EVENTRAILS_CACHE": str(tmp_path / "cache"),
           "GO": str(tmp_path / "no-go")}
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=60, env=env,
                            check=False)
    # GO names a missing file, so the script finds no toolchain to build with.
    assert result.returncode != 0
    assert "Go" in result.stderr and not (tmp_path / "cache" / "helm" / pinned_version() / "bin" / "helm").exists()
