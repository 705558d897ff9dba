"""Run a throwaway Kubernetes control plane on 127.0.0.1 for end-to-end tests.

etcd, kube-apiserver and kube-controller-manager run as child processes on free ports,
with certificates, keys and data in one temporary directory. There is no kubelet and no
scheduler: objects are stored, validated, garbage-collected and namespaced as in a real
cluster, but pods never run. The binaries are built from the Go modules in
``tools/controlplane`` by ``scripts/build-controlplane.sh`` into a cache directory shared
by every checkout (see docs/control-plane.md).

The admin identity is a client certificate in the ``system:masters`` group;
``ControlPlane.user_kubeconfig`` mints further identities that RBAC treats as ordinary
users.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import logging
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import yaml

from eventrails._natsserver import free_port

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.x509 import Certificate

logger = logging.getLogger("eventrails.controlplane")

KUBERNETES_VERSION = "v1.35.4"
ETCD_VERSION = "v3.6.17"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")

# The first address of the service range becomes the ClusterIP of the `kubernetes`
# Service, so the serving certificate names it too.
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
# Enough for objects to be cleaned up and for RBAC's aggregated roles (view, edit, admin)
# to carry rules; nothing here runs workloads.
DEFAULT_CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "clusterrole-aggregation-controller",
)
ADMIN_USER = "eventrails-admin"

_REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = _REPO_ROOT / "scripts" / "build-controlplane.sh"


class ControlPlaneError(RuntimeError):
    """A control-plane process failed to start, or a kubectl command failed."""


class ControlPlaneNotBuilt(ControlPlaneError):
    """Some control-plane binaries are missing from the binary directory."""


def cache_dir() -> Path:
    """Return the directory that contains the binaries for the pinned versions.

    ``EVENTRAILS_CONTROLPLANE_BIN`` overrides it, for binaries built elsewhere;
    otherwise it sits under ``EVENTRAILS_CACHE`` (default ``~/.cache/eventrails``).
    """
    override = os.environ.get("EVENTRAILS_CONTROLPLANE_BIN")
    if override:
        return Path(override)
    cache = Path(os.environ.get("EVENTRAILS_CACHE") or Path.home() / ".cache" / "eventrails")
    return cache / "controlplane" / f"kubernetes-{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}" / "bin"


def find_binaries(bin_dir: Path | None = None) -> dict[str, Path]:
    """Return the path of each control-plane binary, or raise ``ControlPlaneNotBuilt``."""
    directory = bin_dir or cache_dir()
    found = {name: directory / name for name in BINARIES}
    missing = [name for name, path in found.items() if not os.access(path, os.X_OK)]
    if missing:
        raise ControlPlaneNotBuilt(
            f"control-plane binaries missing from {directory}: {', '.join(missing)}; "
            f"build them with {BUILD_SCRIPT} (needs Go) or set EVENTRAILS_CONTROLPLANE_BIN "
            "to a directory that contains etcd, kube-apiserver, kube-controller-manager and kubectl"
        )
    return found


def find_go() -> str | None:
    """Return the Go toolchain the build script would use, if there is one."""
    configured = os.environ.get("GO")
    if configured:
        return configured if shutil.which(configured) else None
    on_path = shutil.which("go")
    if on_path:
        return on_path
    default_install = Path("/usr/local/go/bin/go")
    return str(default_install) if default_install.exists() else None


def build_binaries(timeout: float = 3 * 3600, output: IO[str] | None = None) -> Path:
    """Run the build script and return the binary directory it reports.

    When the binaries are already in the cache the script returns at once. ``output`` receives the
    script's progress lines (its stderr); by default they go to this process's stderr.
    """
    if not BUILD_SCRIPT.exists():
        raise ControlPlaneNotBuilt(f"{BUILD_SCRIPT} is missing: building needs a source checkout of eventrails")
    go = find_go()
    env = os.environ | ({"GO": go} if go else {})
    logger.info("building the control plane with %s; a cold build takes long", BUILD_SCRIPT)
    try:
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=output, text=True, env=env,
            timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ControlPlaneError(f"{BUILD_SCRIPT} did not finish within {timeout:.0f}s") from exc
    if result.returncode != 0:
        raise ControlPlaneError(
            f"{BUILD_SCRIPT} failed with exit code {result.returncode}; see its output above for the cause"
        )
    lines = result.stdout.strip().splitlines()
    if not lines:
        raise ControlPlaneError(f"{BUILD_SCRIPT} succeeded but printed no binary directory")
    return Path(lines[-1])


# --- certificates -------------------------------------------------------------------------

def _pem_key(key: EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption(),
    )


def _pem_cert(cert: Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class _Certificate:
    cert_pem: bytes
    key_pem: bytes


class _Authority:
    """A throwaway certificate authority that signs the serving and client certificates."""

    def __init__(self, common_name: str) -> None:
        try:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import ec
        except ImportError as exc:
            raise ControlPlaneError(
                "the control plane needs the 'cryptography' package for its certificates: "
                "pip install 'cryptography>=46'"
            ) from exc
        self._x509, self._hashes, self._ec = x509, hashes, ec
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
        certificate = (
            self._builder(self._name, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = _pem_cert(certificate)

    def _builder(self, subject: Any, public_key: Any) -> Any:
        """Return a builder for a certificate issued by this authority, valid from an hour ago for a week."""
        x509 = self._x509
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
        )

    def issue(
        self, common_name: str, organizations: Sequence[str] = (), *,
        dns_names: Sequence[str] = (), ip_addresses: Sequence[str] = (),
    ) -> _Certificate:
        """Sign a leaf certificate: a server certificate when it has names, else a client one.

        Kubernetes reads a client certificate's common name as the user name and its
        organizations as the groups.
        """
        x509 = self._x509
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        attributes = [x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, org) for org in organizations]
        attributes.append(x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name))
        server = bool(dns_names or ip_addresses)
        usage = x509.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            self._builder(x509.Name(attributes), key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            alternatives: list[Any] = [x509.DNSName(name) for name in dns_names]
            alternatives += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
            builder = builder.add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        certificate = builder.sign(self._key, self._hashes.SHA256())
        return _Certificate(_pem_cert(certificate), _pem_key(key))


def _service_account_key_pair() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return _pem_key(key), public


def _write_private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- processes ----------------------------------------------------------------------------

def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class _Process:
    name: str
    args: list[str]
    log_file: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_file.open("ab") as log:
            # A session of its own keeps a terminal's Ctrl-C from reaching the process
            # before the control plane stops it in order.
            self.popen = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        logger.debug("started %s pid=%s log=%s", self.name, self.popen.pid, self.log_file)

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise ControlPlaneError(
                f"{self.name} exited with code {self.popen.returncode} during startup; "
                f"last lines of {self.log_file}:\n{_log_tail(self.log_file)}"
            )

    def stop(self, timeout: float) -> None:
        popen, self.popen = self.popen, None
        if popen is None or popen.poll() is not None:
            return
        popen.terminate()
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s pid=%s did not stop within %.0fs; killing it", self.name, popen.pid, timeout)
            popen.kill()
            popen.wait()


@dataclass
class ControlPlane:
    """etcd, kube-apiserver and kube-controller-manager on 127.0.0.1 and free ports.

    ``root_dir`` contains certificates, etcd data, logs and kubeconfigs; a temporary one is
    made (and removed by ``cleanup``) when none is given. ``bin_dir`` defaults to the
    cache directory the build script fills.
    """

    root_dir: Path | None = None
    bin_dir: Path | None = None
    controllers: Sequence[str] = DEFAULT_CONTROLLERS
    host: str = "127.0.0.1"
    etcd_port: int = 0
    apiserver_port: int = 0
    startup_seconds: dict[str, float] = field(default_factory=dict, init=False)
    _binaries: dict[str, Path] = field(default_factory=dict, init=False, repr=False)
    _authority: _Authority | None = field(default=None, init=False, repr=False)
    _processes: list[_Process] = field(default_factory=list, init=False, repr=False)
    _own_root: bool = field(default=False, init=False, repr=False)

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.apiserver_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://{self.host}:{self.etcd_port}"

    @property
    def kubeconfig(self) -> Path:
        """Return the admin kubeconfig, for kubectl, the ``kubernetes`` client and kopf."""
        return self._root / "admin.kubeconfig"

    @property
    def running(self) -> bool:
        return bool(self._processes) and all(p.popen is not None and p.popen.poll() is None for p in self._processes)

    @property
    def _root(self) -> Path:
        if self.root_dir is None:
            raise ControlPlaneError("the control plane has not been started")
        return self.root_dir

    def start(self, timeout: float = 90.0) -> ControlPlane:
        """Start etcd, then kube-apiserver, then kube-controller-manager; each must be healthy
        before the next starts. Raises ``ControlPlaneError`` with the failing process's log."""
        if self.running:
            return self
        self._binaries = find_binaries(self.bin_dir)
        if self.root_dir is None:
            self.root_dir = Path(tempfile.mkdtemp(prefix="eventrails-k8s-"))
            self._own_root = True
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.etcd_port = self.etcd_port or free_port(self.host)
        self.apiserver_port = self.apiserver_port or free_port(self.host)
        deadline = time.monotonic() + timeout
        began = time.monotonic()

        try:
            self._write_credentials()

            etcd = self._spawn("etcd", self._etcd_args())
            self._wait_healthy(etcd, f"{self.etcd_url}/health", deadline, tls=False)
            self.startup_seconds["etcd"] = time.monotonic() - began

            apiserver = self._spawn("kube-apiserver", self._apiserver_args())
            self._wait_healthy(apiserver, f"{self.server}/readyz", deadline, tls=True)
            self.startup_seconds["kube-apiserver"] = time.monotonic() - began

            manager_port = free_port(self.host)
            manager = self._spawn("kube-controller-manager", self._controller_manager_args(manager_port))
            manager_health = f"https://{self.host}:{manager_port}/healthz"
            self._wait_healthy(manager, manager_health, deadline, tls=True, verify=False)
            self.startup_seconds["kube-controller-manager"] = time.monotonic() - began
        except BaseException:
            self.stop()
            raise

        logger.info(
            "control plane ready at %s in %.1fs (etcd %.1fs, kube-apiserver %.1fs); kubeconfig %s",
            self.server, self.startup_seconds["kube-controller-manager"], self.startup_seconds["etcd"],
            self.startup_seconds["kube-apiserver"], self.kubeconfig,
        )
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the processes in reverse start order; the data directory stays."""
        for process in reversed(self._processes):
            process.stop(timeout)
        self._processes.clear()

    def cleanup(self) -> None:
        self.stop()
        if self._own_root and self.root_dir is not None:
            shutil.rmtree(self.root_dir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # --- clients ---------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, timeout: float = 60.0, check: bool = True,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as the admin (or with ``kubeconfig``) and return its result.

        With ``check`` a non-zero exit raises ``ControlPlaneError`` carrying kubectl's stderr.
        """
        command = [str(self._binaries["kubectl"]), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args]
        try:
            result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ControlPlaneError(f"kubectl {' '.join(args)} did not finish within {timeout:.0f}s") from exc
        if check and result.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} failed with exit code {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def user_kubeconfig(self, user: str, groups: Sequence[str] = ()) -> Path:
        """Write a kubeconfig for a client-certificate identity with no permissions of its own.

        RBAC treats the identity as ``user`` in ``groups`` and ``system:authenticated``, so
        bind roles to grant it access. Returns the path of the new kubeconfig.
        """
        if self._authority is None:
            raise ControlPlaneError("the control plane has not been started")
        credentials = self._authority.issue(user, groups)
        path = self._root / f"{user}.kubeconfig"
        self._write_kubeconfig(path, user, credentials)
        return path

    def environ(self) -> dict[str, str]:
        """Return this process's environment with KUBECONFIG set to the admin kubeconfig."""
        return os.environ | {"KUBECONFIG": str(self.kubeconfig)}

    # --- internals -------------------------------------------------------------------------

    def _write_credentials(self) -> None:
        pki = self._root / "pki"
        pki.mkdir(exist_ok=True)
        self._authority = authority = _Authority("eventrails-test-ca")
        (pki / "ca.crt").write_bytes(authority.cert_pem)

        service_ip = str(next(ipaddress.ip_network(SERVICE_CLUSTER_IP_RANGE).hosts()))
        serving = authority.issue(
            "kube-apiserver",
            dns_names=[
                "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ip_addresses=[self.host, service_ip],
        )
        (pki / "apiserver.crt").write_bytes(serving.cert_pem)
        _write_private(pki / "apiserver.key", serving.key_pem)

        private, public = _service_account_key_pair()
        _write_private(pki / "service-account.key", private)
        (pki / "service-account.pub").write_bytes(public)

        admin = authority.issue(ADMIN_USER, ["system:masters"])
        (pki / "admin.crt").write_bytes(admin.cert_pem)
        _write_private(pki / "admin.key", admin.key_pem)
        self._write_kubeconfig(self.kubeconfig, ADMIN_USER, admin)

    def _write_kubeconfig(self, path: Path, user: str, credentials: _Certificate) -> None:
        ca_pem = (self._root / "pki" / "ca.crt").read_bytes()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "eventrails-test", "cluster": {
                "server": self.server, "certificate-authority-data": _b64(ca_pem),
            }}],
            "users": [{"name": user, "user": {
                "client-certificate-data": _b64(credentials.cert_pem),
                "client-key-data": _b64(credentials.key_pem),
            }}],
            "contexts": [{"name": user, "context": {"cluster": "eventrails-test", "user": user}}],
            "current-context": user,
        }
        _write_private(path, yaml.safe_dump(config, sort_keys=False).encode())

    def _spawn(self, name: str, args: list[str]) -> _Process:
        logs = self._root / "logs"
        logs.mkdir(exist_ok=True)
        process = _Process(name, [str(self._binaries[name]), *args], logs / f"{name}.log")
        self._processes.append(process)
        process.start()
        return process

    def _etcd_args(self) -> list[str]:
        peer = f"http://{self.host}:{free_port(self.host)}"
        return [
            "--name=eventrails-test",
            f"--data-dir={self._root / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=eventrails-test={peer}",
            # Test data need not survive a power cut; skipping fsync makes writes much faster.
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        pki = self._root / "pki"
        return [
            f"--etcd-servers={self.etcd_url}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'service-account.pub'}",
            f"--service-account-signing-key-file={pki / 'service-account.key'}",
            f"--service-account-issuer={self.server}",
            "--authorization-mode=RBAC",
            f"--secure-port={self.apiserver_port}",
            f"--bind-address={self.host}",
            f"--advertise-address={self.host}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            # No pods run here, so nothing needs service-account tokens mounted into them.
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            # Endpoints cannot contain loopback addresses, so the default reconciler would
            # keep failing to publish 127.0.0.1 for the `kubernetes` Service.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
        ]

    def _controller_manager_args(self, port: int) -> list[str]:
        pki = self._root / "pki"
        return [
            # Without authentication and authorization kubeconfigs its own HTTPS port
            # serves only the health checks, which is all the startup wait needs.
            f"--kubeconfig={self.kubeconfig}",
            f"--controllers={','.join(self.controllers)}",
            f"--service-account-private-key-file={pki / 'service-account.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--leader-elect=false",
            f"--secure-port={port}",
            f"--bind-address={self.host}",
            f"--cert-dir={pki / 'controller-manager'}",
            "--profiling=false",
        ]

    def _ssl_context(self, verify: bool) -> ssl.SSLContext:
        pki = self._root / "pki"
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        if not verify:
            # kube-controller-manager serves health checks with a certificate it signs itself.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return context

    def _wait_healthy(self, process: _Process, url: str, deadline: float, *, tls: bool, verify: bool = True) -> None:
        """Poll ``url`` until it returns HTTP 200, the process exits, or the deadline passes."""
        context = self._ssl_context(verify) if tls else None
        last = "no answer yet"
        while time.monotonic() < deadline:
            process.check_alive()
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read(300).decode(errors='replace')}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise ControlPlaneError(
            f"{process.name} was not healthy at {url} before the startup deadline ({last}); "
            f"last lines of {process.log_file}:\n{_log_tail(process.log_file)}"
        )


def _stop_on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main() -> None:
    """Run a control plane until Ctrl-C, SIGTERM or SIGHUP: ``python -m eventrails._controlplane``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # SIGTERM and a closed terminal stop it as Ctrl-C does, so that its servers stop too.
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGHUP, _stop_on_signal)
    plane = ControlPlane()
    try:
        plane.start()
    except ControlPlaneError as exc:
        # The directory stays, so the logs named in the message can be read.
        logger.error("%s", exc)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        # start() stopped what it had started; only the directory is left.
        plane.cleanup()
        return
    try:
        print(f"export KUBECONFIG={plane.kubeconfig}")
        print(f"export PATH={find_binaries()['kubectl'].parent}:$PATH")
        print("Ctrl-C (or SIGTERM) stops the control plane and removes its directory.", flush=True)
        while plane.running:
            time.sleep(1)
        logger.error("a control-plane process exited (logs in %s); stopping the others", plane.root_dir)
    except KeyboardInterrupt:
        pass
    finally:
        plane.cleanup()


if __name__ == "__main__":
    main()
