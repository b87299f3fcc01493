"""A `pieced run` subprocess for the benchmarks: started in a folder of its own, waited
for until it says it is listening, stopped with SIGTERM (which must exit 0) or killed.
Its stderr goes to ``folder/daemon.log``, whose tail every error message carries."""

from __future__ import annotations

import compileall
import contextlib
import functools
import os
import select
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@functools.cache
def byte_compile() -> None:
    """Compile the package's modules to bytecode once, as ``pip install`` does: the
    editable install of the checkout has none, and a machine with
    PYTHONDONTWRITEBYTECODE set never writes any, so every ``pieced`` process would
    compile its modules anew (about 15 ms of each command's start-up). Timings of whole
    ``pieced`` processes are of an installed program, not of that."""
    for pkg in ("config", "daemon", "peer", "protocol", "storage"):
        compileall.compile_dir(REPO / pkg, quiet=1)


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status that describe memory, in bytes."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) * (1024 if parts[-1] == "kB" else 1)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_syscall_bytes(pid: int) -> int:
    """Bytes a running process has read with read/pread so far (``rchar``; not what it
    reads through maps), from /proc."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


class DaemonProcess:
    def __init__(self, folder: Path, cmd: list[str], env: dict[str, str] | None = None,
                 append_log: bool = False) -> None:
        self.folder = folder
        self.cmd = cmd
        self.env = env
        self.append_log = append_log  # one log over many starts (crash rounds)
        self.log_path = folder / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        byte_compile()
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab" if self.append_log else "wb") as errlog:
            errlog.write(f"--- start at {time.strftime('%H:%M:%S')}\n".encode())
            errlog.flush()
            self.proc = subprocess.Popen(self.cmd, cwd=self.folder, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=errlog)
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        seen = b""
        while b"listening" not in seen:
            left = deadline - time.monotonic()
            chunk = b"-"
            if left > 0 and select.select([fd], [], [], min(left, 0.5))[0]:
                chunk = os.read(fd, 4096)  # b"": it exited
                seen += chunk
            if left <= 0 or not chunk:
                self.kill()
                raise RuntimeError(f"the daemon did not start: {seen!r}\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self, timeout: float = 300.0) -> int:
        """SIGTERM: a clean stop, which must exit 0."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"the daemon did not stop on SIGTERM\n{self.log_tail()}") from None
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if rc != 0:
            raise RuntimeError(f"the daemon exited {rc} on SIGTERM\n{self.log_tail()}")
        return rc

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""
