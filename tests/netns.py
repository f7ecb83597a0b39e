"""Simulated hosts for the multi-host tests: Linux network namespaces on a private switch.

Each `Host` is a network namespace with one interface on a bridge that lives in a namespace of
its own (the switch), so no traffic touches the machine's own network. Every process started on
a host also gets its own PID, UTS (hostname) and mount namespace with a private /dev/shm: shm
rings, same-host pools and /proc lookups fail across hosts exactly as on real machines.

  net = Network("sp1234", ["a", "b"]);  net["a"].address -> "10.77.0.1"
  proc = net["b"].spawn([...], env, log)     a process "on" host b
  net["b"].partition() / heal()              silent: its port leaves the switch, and returns
  net["b"].kill()                            SIGKILL every process of the host
  net.close()
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path


def usable() -> str:
    """"" when network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"spprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if made.returncode:
        return f"ip netns add is not permitted: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Host:
    def __init__(self, network: Network, name: str, index: int):
        self.network = network
        self.name = name
        self.netns = f"{network.prefix}-{name}"
        self.address = f"10.77.0.{index + 1}"
        self.hostname = f"host-{name}"
        self.port = f"p{name}"  # its port on the switch
        self.processes: list[subprocess.Popen] = []
        _ip("netns", "add", self.netns)
        _ip("-n", network.switch, "link", "add", self.port, "type", "veth", "peer", "name",
            "eth0", "netns", self.netns)
        _ip("-n", network.switch, "link", "set", self.port, "master", "br0", "up")
        _ip("-n", self.netns, "link", "set", "lo", "up")
        _ip("-n", self.netns, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _ip("-n", self.netns, "link", "set", "eth0", "up")

    def spawn(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """Start `argv` on this host: its network, and a PID/UTS/mount namespace of its own
        with this host's name and a private /dev/shm."""
        setup = f"hostname {self.hostname} && mount -t tmpfs tmpfs /dev/shm && exec \"$@\""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork", "--uts",
                 "--mount", "--mount-proc", "--kill-child", "sh", "-c", setup, "sh", *argv],
                env=env, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(proc)
        return proc

    def run(self, argv: list[str], env: dict[str, str], timeout_s: float) -> str:
        """Run `argv` in this host's network (only) and return its stdout."""
        out = subprocess.run(["ip", "netns", "exec", self.netns, *argv], env=env,
                             capture_output=True, timeout=timeout_s)
        if out.returncode:
            raise RuntimeError(f"{argv[:3]} on {self.name} exited {out.returncode}: "
                               f"{out.stderr.decode()[-2000:]}")
        return out.stdout.decode()

    def partition(self) -> None:
        """Cut the host off: its packets, and packets to it, vanish (no reset, no error)."""
        _ip("-n", self.network.switch, "link", "set", self.port, "nomaster")

    def heal(self) -> None:
        _ip("-n", self.network.switch, "link", "set", self.port, "master", "br0")

    def kill(self) -> None:
        """Every process of the host dies at once (SIGKILL to each PID namespace's init)."""
        self._signal_inits(signal.SIGKILL, wait_s=10)
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()

    def stop(self) -> None:
        self._signal_inits(signal.SIGTERM, wait_s=20)
        self.kill()

    def _signal_inits(self, signum: int, wait_s: float) -> None:
        """`signum` to each PID namespace's init (unshare's child), then wait for them."""
        for proc in self.processes:
            if proc.poll() is None:
                for child in _children(proc.pid):
                    try:
                        os.kill(child, signum)
                    except ProcessLookupError:
                        pass
        for proc in self.processes:
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass

def _children(pid: int) -> list[int]:
    """The direct children of `pid` (ip netns exec execs unshare, which forks one)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


class Network:
    def __init__(self, prefix: str, hosts: list[str]):
        self.prefix = prefix
        self.switch = f"{prefix}-sw"
        self.hosts: dict[str, Host] = {}
        _ip("netns", "add", self.switch)
        try:
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for index, name in enumerate(hosts):
                self.hosts[name] = Host(self, name, index)
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def close(self) -> None:
        for host in self.hosts.values():
            host.stop()
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)
