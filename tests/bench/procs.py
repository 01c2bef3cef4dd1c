"""Every process the bench starts goes through one ``Procs`` registry, which stops them all.

``Procs`` is a context manager: leaving it (normally, on an error, on Ctrl-C or SIGTERM)
terminates every process still running, then kills what did not exit. Children also get
PR_SET_PDEATHSIG, so even a bench killed with SIGKILL leaves nothing behind. Memory of a
process is read from /proc: ``reset_peak`` (clear_refs 5, Linux >= 4.0) restarts its VmHWM
from the current RSS, so a peak can be measured for one run of one scenario.
"""
from __future__ import annotations

import ctypes
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: `python -m gateway` runs from here
PR_SET_PDEATHSIG = 1


def raise_nofile() -> None:
    """2,000 concurrent sockets per process (and children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def status_kb(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def cpu_s(self) -> float:
        """User + system CPU seconds used so far (all threads)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        return self.status_kb("VmRSS") / 1024

    def peak_mb(self) -> float:
        return self.status_kb("VmHWM") / 1024

    def reset_peak(self) -> float:
        """Restart VmHWM at the current RSS; return that RSS in MB."""
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")
        return self.rss_mb()

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def __enter__(self) -> "Procs":
        # Explicitly, since a shell starting us in the background leaves SIGINT ignored.
        signal.signal(signal.SIGINT, _raise_interrupt)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def start(self, name: str, cmd: list[str], *, ready: str = "listening on", timeout_s: float = 60.0,
              env: dict | None = None) -> Proc:
        """Start ``cmd``; wait for a stdout line containing ``ready`` and take the URL from it."""
        log = self.workdir / f"{name}.log"
        popen = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=open(log, "ab"), stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, preexec_fn=_die_with_parent,
            start_new_session=True,  # Ctrl-C reaches the bench only; it stops the children in order
        )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not select.select([popen.stdout], [], [], 0.5)[0]:
                if popen.poll() is None:
                    continue
            line = popen.stdout.readline()
            if not line:
                raise RuntimeError(f"{name} exited before it was ready (rc={popen.poll()}):\n{proc.tail()}")
            if ready in line:
                if "http://" in line:
                    proc.url = "http://" + line.split("http://", 1)[1].split()[0]
                popen.stdout.close()  # nothing more is printed that we need
                return proc
        raise RuntimeError(f"{name} not ready after {timeout_s} s:\n{proc.tail()}")

    def run(self, name: str, cmd: list[str], *, timeout_s: float) -> str:
        """Run a one-shot command (wrk, the load client) to its end; return its stdout."""
        log = self.workdir / f"{name}.log"
        popen = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=open(log, "ab"), stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=_die_with_parent, start_new_session=True,
        )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        try:
            out, _ = popen.communicate(timeout=timeout_s)
        finally:
            self.stop(proc, grace_s=2)
        if popen.returncode != 0:
            raise RuntimeError(f"{name} failed (rc={popen.returncode}): {' '.join(cmd)}\n{out}\n{proc.tail()}")
        return out

    def stop(self, proc: Proc, grace_s: float = 10.0) -> None:
        if proc.alive():
            proc.popen.terminate()
            try:
                proc.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        procs, self.procs = list(self.procs), []
        for proc in procs:
            if proc.alive():
                proc.popen.terminate()
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)

    # ---- the shared pieces --------------------------------------------------------------

    def upstream(self) -> Proc:
        return self.start("upstream", [sys.executable, "-m", "tests.bench.upstream"])

    def minimal_proxy(self, upstream_url: str, name: str = "minimal") -> Proc:
        return self.start(name, [sys.executable, "-m", "tests.bench.minimal_proxy", "--upstream", upstream_url])

    def gateway(self, config_path: Path, name: str) -> Proc:
        return self.start(name, [sys.executable, "-m", "gateway", "serve", "--config", str(config_path), "--port", "0"])

    def redis(self) -> Proc:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found on PATH (apt-get install redis-server)")
        port = free_port()
        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--maxclients", "10000", "--loglevel", "warning"]
        log = self.workdir / "redis.log"
        popen = subprocess.Popen(cmd, cwd=self.workdir, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, start_new_session=True)
        proc = Proc("redis", popen, log, url=f"redis://127.0.0.1:{port}/0")
        self.procs.append(proc)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return proc
            except OSError:
                time.sleep(0.05)
            if not proc.alive():
                break
        raise RuntimeError(f"redis-server did not start:\n{proc.tail()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
