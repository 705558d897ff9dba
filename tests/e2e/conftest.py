"""End-to-end fixtures: a real etcd, kube-apiserver and kube-controller-manager on 127.0.0.1.

The binaries come from the cache that scripts/build-controlplane.sh fills. When they are
missing and Go is installed, collection builds them first (a cold build takes long, so it
runs before any test's timeout starts; EVENTRAILS_BUILD_CONTROLPLANE=0 skips instead).
Without the binaries and without Go, the tests skip with the reason.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventrails._controlplane import (
    ControlPlane,
    ControlPlaneError,
    ControlPlaneNotBuilt,
    build_binaries,
    find_binaries,
    find_go,
)

# Every fixture that needs the binaries depends on this one.
_FIXTURE = "control_plane_bin"
# Why the control plane cannot run (None when it can), decided once at collection time.
_unavailable: str | None = None
_build_error: str | None = None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    global _unavailable, _build_error
    if not any(_FIXTURE in getattr(item, "fixturenames", ()) for item in items):
        return
    try:
        find_binaries()
        return
    except ControlPlaneNotBuilt as exc:
        missing = str(exc)

    if find_go() is None:
        _unavailable = f"{missing}; Go is not installed either, so they cannot be built here"
        return
    if os.environ.get("EVENTRAILS_BUILD_CONTROLPLANE", "1") == "0":
        _unavailable = f"{missing}; EVENTRAILS_BUILD_CONTROLPLANE=0 forbids building them during the tests"
        return

    # Show the build's progress: pytest would otherwise capture it until the end.
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        sys.stderr.write("\nbuilding the Kubernetes test control plane for the e2e tests (a cold build takes long)\n")
        began = time.monotonic()
        try:
            bin_dir = build_binaries()
            find_binaries(bin_dir)
        except ControlPlaneError as exc:
            _build_error = str(exc)
            return
        sys.stderr.write(f"control plane binaries ready in {bin_dir} after {time.monotonic() - began:.0f}s\n")


@pytest.fixture(scope="session")
def control_plane_bin() -> Path:
    """The directory with etcd, kube-apiserver, kube-controller-manager and kubectl."""
    if _build_error is not None:
        pytest.fail(f"building the control plane failed: {_build_error}", pytrace=False)
    if _unavailable is not None:
        pytest.skip(_unavailable)
    return find_binaries()["kubectl"].parent


@pytest.fixture(scope="session")
def control_plane(control_plane_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One control plane for the whole session, with the admin kubeconfig in ``.kubeconfig``."""
    plane = ControlPlane(root_dir=tmp_path_factory.mktemp("control-plane"), bin_dir=control_plane_bin)
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture()
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A fresh namespace; deleting it at the end is left to the namespace controller."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def crds_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "crds"
