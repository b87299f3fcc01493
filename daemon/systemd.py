"""The two systemd protocols the daemon speaks, without libsystemd.

sd_notify: datagrams such as ``READY=1`` to ``$NOTIFY_SOCKET`` (a path, or an
abstract socket when it starts with '@'). Socket activation: listening sockets
handed over as descriptors 3.. with ``$LISTEN_FDS`` and ``$LISTEN_PID``.
"""

from __future__ import annotations

import logging
import os
import socket

SD_LISTEN_FDS_START = 3
MIN_PING_INTERVAL = 0.01  # seconds: a timeout of a few microseconds pings no busier

log = logging.getLogger("pieced")


def notify(message: str, env: dict[str, str] | None = None) -> bool:
    """Send one notification; False when not running under systemd (or it failed)."""
    addr = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), addr)
        return True
    except OSError:
        return False


def listen_fds(unset: bool = True) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (empty when none were)."""
    env = os.environ
    try:
        if int(env.get("LISTEN_PID", "0")) != os.getpid():
            return []
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    if unset:  # children must not think the sockets are theirs
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(k, None)
    out = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        out.append(socket.socket(fileno=fd))
    return out


def watchdog_interval() -> float | None:
    """Half the watchdog timeout in seconds, if systemd asked this process for pings."""
    env = os.environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    try:
        if pid and int(pid) != os.getpid():
            return None
        seconds = int(usec) / 2e6
    except ValueError:
        seconds = 0.0
    if seconds <= 0:  # (not systemd's doing: a ping loop with no pause, or a traceback)
        log.warning("WATCHDOG_USEC=%r WATCHDOG_PID=%r make no sense: no watchdog pings",
                    usec, pid)
        return None
    return max(seconds, MIN_PING_INTERVAL)
