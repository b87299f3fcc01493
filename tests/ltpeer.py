"""A real libtorrent peer on loopback, for tests and benchmarks of the pieced peer.

``LtPeer`` runs one libtorrent session with one torrent on 127.0.0.1, as a seeder (data
present, checked before the constructor returns) or a leecher (empty save path). The
session speaks plain TCP only: no uTP, no protocol encryption, no DHT/LSD/UPnP/NAT-PMP,
no trackers, no rate limits, and peers are unchoked at once, so loopback transfers are
fast and hardly wait for timers. Peers are introduced explicitly, with
``connect`` (``torrent_handle.connect_peer``) or by connecting to ``LtPeer.port``.

A background thread drains the session's alerts (``pop_alerts``) all the time, counting
hash failures and errors and, with ``log_peer=True``, keeping every ``peer_log_alert``
line, so the alert queue never fills up however long a benchmark runs.

Like ``tests/realtools.py`` it uses only the standard library and libtorrent, so that the
benchmark scripts can import it too.

What libtorrent does on the wire
--------------------------------
libtorrent 2.1.1 with these settings, seen from a raw socket connected to (or accepting
a connection from) an ``LtPeer``:

* A seed answering a handshake with the fast (0x04 in reserved byte 7) and extension
  protocol (0x10 in byte 5) bits sends, after its own handshake: EXTENDED (id 20, the
  extension handshake: ``m`` = ut_pex 1, ut_metadata 2, upload_only 3, ut_holepunch 4,
  lt_donthave 7, share_mode 8; ``upload_only`` 1, ``reqq`` 2000, ``metadata_size``,
  ``yourip``, ``v``), then HAVE_ALL (14), then UNCHOKE (1), before the peer has said
  anything: loopback peers are in libtorrent's local peer class, which ignores unchoke
  slots (so also with the default ``unchoke_slots_limit``). No BITFIELD, no HAVE.
  When the peer then sends HAVE_NONE and INTERESTED (together), the seed answers with
  5 ALLOWED_FAST (17) and a second UNCHOKE.
* Its handshake's reserved bytes are ``00 00 00 00 00 10 00 05`` (extension protocol,
  fast, and the DHT bit although DHT is off); for a hybrid torrent also 0x10 in byte 7
  (``...00 15``), with the v1 info hash, when the peer's handshake did not set that bit.
* Hybrid torrent, peer's handshake sets 0x10 in byte 7 (v1 or truncated v2 info hash
  in it): the answer carries the truncated v2 info hash (first 20 bytes of the SHA-256)
  and drops 0x10 from its reserved bytes. A v1 torrent (with or without pad files) and
  a handshake with 0x10: libtorrent closes the connection without answering ("invalid
  info-hash" in its peer log).
* v2-only torrent: the info hash in the handshake, both ways, is the SHA-256 of the
  bencoded info dict truncated to 20 bytes (``handshake_info_hash``); libtorrent never
  sets 0x10 in byte 7 for it.
* A leecher connecting out (handshake as above: for a hybrid torrent the v1 info hash
  and 0x10 in byte 7) sends EXTENDED, HAVE_NONE, INTERESTED, then REQUESTs once
  unchoked. Blocks wholly inside pad files are never requested; with v1 piece hashes
  (v1 with pads, hybrid) a block that is partly pad is requested whole (16 KiB, the
  pad bytes count as payload), while for a v2-only torrent the request stops at the
  end of the file (e.g. 7232 bytes).
* Given the full .torrent (piece layers included) a leecher sends no HASH_REQUEST
  (21), neither to a raw-socket seed (v2-only and hybrid, watched for 2 s) nor to
  another libtorrent; a libtorrent seed sends none either.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import libtorrent as lt

__all__ = [
    "LtPeer",
    "handshake_info_hash",
    "lt_peer_settings",
    "make_torrent_v1_pads",
]

_STATE_NAMES = {int(v): str(k) for k, v in lt.torrent_status.states.names.items()}


def make_torrent_v1_pads(content: Path, piece_length: int) -> bytes:
    """A v1-only .torrent of ``content`` with BEP 47 pad files, made by libtorrent.

    ``create_torrent`` flags ``v1_only | canonical_files``: files in the order v2
    torrents use, and every file that does not end on a piece boundary, the last one
    too, followed by a pad file up to the next one (the file layout of a hybrid
    torrent, without the v2 part); ``tests/realtools.py`` makes v1 torrents without
    pads only.
    """
    content = content.resolve()
    entries = lt.list_files(str(content))
    if not entries:
        raise ValueError(f"make_torrent_v1_pads: no files under {content}")
    flags = lt.create_torrent.v1_only | lt.create_torrent.canonical_files
    ct = lt.create_torrent(entries, piece_length, flags)
    ct.set_creator("pieced tests/ltpeer.py")
    lt.set_piece_hashes(ct, str(content.parent))
    return bytes(lt.bencode(ct.generate()))


def handshake_info_hash(torrent: bytes) -> bytes:
    """The 20-byte info hash a BitTorrent handshake for ``torrent`` carries.

    The SHA-1 of the info dict for v1 and hybrid torrents; for v2-only torrents the
    SHA-256 of the info dict truncated to 20 bytes (BEP 52).
    """
    ih = lt.torrent_info(torrent).info_hashes()
    if ih.has_v1():
        return bytes(ih.v1.to_bytes())
    return bytes(ih.v2.to_bytes())[:20]


def lt_peer_settings(port: int = 0, log_peer: bool = False) -> dict[str, Any]:
    """Session settings for an ``LtPeer`` listening on 127.0.0.1:``port`` (0: any)."""
    cats = lt.alert.category_t
    if log_peer:
        mask = cats.all_categories
    else:
        mask = (
            cats.error_notification
            | cats.status_notification
            | cats.storage_notification
            | cats.peer_notification
        )
    return {
        "listen_interfaces": f"127.0.0.1:{port}",
        "enable_incoming_tcp": True,
        "enable_outgoing_tcp": True,
        "enable_incoming_utp": False,
        "enable_outgoing_utp": False,
        "in_enc_policy": int(lt.enc_policy.pe_disabled),
        "out_enc_policy": int(lt.enc_policy.pe_disabled),
        "allowed_enc_level": int(lt.enc_level.plaintext),
        "prefer_rc4": False,
        "allow_multiple_connections_per_ip": True,
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_ip_notifier": False,
        "dht_bootstrap_nodes": "",
        "announce_to_all_trackers": False,
        "announce_to_all_tiers": False,
        # A seed may connect out too (to a pieced peer that only listens).
        "seeding_outgoing_connections": True,
        # No rate limits at all, also not on the protocol overhead.
        "download_rate_limit": 0,
        "upload_rate_limit": 0,
        "rate_limit_ip_overhead": False,
        # No unchoke slots to wait for (loopback peers ignore them anyway, see above).
        "unchoke_slots_limit": -1,
        "smooth_connects": False,
        # connect_peer and the choker act on the session tick: 0.5 s by default, which
        # would be most of a small loopback transfer.
        "tick_interval": 100,
        "connection_speed": 200,
        "alert_mask": mask,
        "alert_queue_size": 1_000_000 if log_peer else 10_000,
    }


class LtPeer:
    """One libtorrent session with one torrent, on 127.0.0.1, TCP only.

    ``seed=True``: ``save_path`` holds the data; the constructor returns once libtorrent
    has checked it and is seeding (``RuntimeError`` if it finds an error, ``TimeoutError``
    after ``timeout`` seconds). ``seed=False``: ``save_path`` is created if need be and
    should be empty. ``port`` 0 picks a free port; ``LtPeer.port`` is the real one.
    ``magnet``: the torrent is added by its info hashes alone (a magnet link), its
    metadata to come from peers (BEP 9).
    ``log_peer`` turns on every alert category and keeps the ``peer_log_alert`` lines.
    ``settings`` override entries of ``lt_peer_settings()``.
    """

    def __init__(
        self,
        torrent: bytes,
        save_path: Path,
        *,
        seed: bool,
        port: int = 0,
        log_peer: bool = False,
        settings: dict[str, Any] | None = None,
        timeout: float = 60.0,
        magnet: bool | str = False,
    ) -> None:
        self.torrent = torrent
        self.save_path = Path(save_path)
        self.seed = seed
        self.ti = lt.torrent_info(torrent)
        # Held while alerts are popped and read (an alert object is only valid until the
        # next pop_alerts) and while the counters below are read.
        self._lock = threading.Lock()
        self._log: list[str] = []
        self._errors: list[str] = []
        self._hash_failures = 0
        self._checked = threading.Event()
        self._closed = False

        pack = lt_peer_settings(port, log_peer)
        pack.update(settings or {})
        # Not a libtorrent setting: rate limits apply to loopback peers too (libtorrent
        # puts them in its local peer class, which ignores limits).
        limit_loopback = bool(pack.pop("limit_loopback", False))
        params = lt.session_params()
        # The stubs call this a settings_pack; the bindings take a plain dict.
        params.settings = pack  # type: ignore[assignment]
        self._ses: Any = lt.session(params)
        if limit_loopback:
            loopback = lt.ip_filter()
            loopback.add_rule("127.0.0.1", "127.0.0.1", 1 << lt.session.global_peer_class_id)
            loopback.add_rule("::1", "::1", 1 << lt.session.global_peer_class_id)
            self._ses.set_peer_class_filter(loopback)
        self._stop = threading.Event()
        self._drainer = threading.Thread(target=self._drain_loop, name="ltpeer-alerts", daemon=True)
        self._drainer.start()
        try:
            self.port: int = self._wait_listening(timeout)
            self.save_path.mkdir(parents=True, exist_ok=True)
            atp = lt.add_torrent_params()
            if magnet == "v2":  # the v2 hash alone, as from a v2 magnet link (btmh)
                atp.info_hashes = lt.info_hash_t(self.ti.info_hashes().v2)
            elif magnet:  # the info hashes alone, as from a magnet link: the rest from peers
                atp.info_hashes = self.ti.info_hashes()
            else:
                atp.ti = self.ti
            atp.save_path = str(self.save_path)
            # Not auto-managed (never queued), not paused, no trackers or web seeds from
            # the .torrent, no peer sources but the ones given by hand.
            atp.flags = (
                lt.torrent_flags.override_trackers
                | lt.torrent_flags.override_web_seeds
                | lt.torrent_flags.disable_dht
                | lt.torrent_flags.disable_lsd
                | lt.torrent_flags.disable_pex
            )
            atp.trackers = []
            atp.url_seeds = []
            self.handle = self._ses.add_torrent(atp)
            if not magnet:  # (without the metadata there is nothing to check)
                self._wait_checked(timeout)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _wait_listening(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            if self._ses.is_listening() and self._ses.listen_port():
                return int(self._ses.listen_port())
            errors = self._errors_now()
            if errors:
                raise RuntimeError(f"libtorrent could not listen: {errors}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"libtorrent session not listening after {timeout}s")
            time.sleep(0.01)

    def _wait_checked(self, timeout: float) -> None:
        """Wait for libtorrent to check what is on disk (it does so also when there is
        nothing); a seed must then have every piece."""
        deadline = time.monotonic() + timeout
        while not self._checked.wait(0.01):
            errors = self._errors_now()
            if errors:
                raise RuntimeError(f"libtorrent: {errors}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not checked after {timeout}s: {self.status()}")
        st = self.handle.status()
        if self.seed and not st.is_seeding:
            raise RuntimeError(
                f"seed is missing data in {self.save_path}: has {st.num_pieces} of "
                f"{self.ti.num_pieces()} pieces ({self.status()})"
            )

    def _errors_now(self) -> list[str]:
        self._drain()
        with self._lock:
            return list(self._errors)

    def _drain_loop(self) -> None:
        while not self._stop.is_set():
            self._ses.wait_for_alert(50)
            self._drain()

    def _drain(self) -> None:
        """Pop the session's alerts and keep what they say."""
        with self._lock:
            if self._ses is None:
                return
            for a in self._ses.pop_alerts():
                if isinstance(a, lt.peer_log_alert):
                    self._log.append(a.message())
                elif isinstance(a, lt.hash_failed_alert):
                    self._hash_failures += 1
                    self._errors.append(a.message())
                elif isinstance(a, lt.torrent_checked_alert):
                    self._checked.set()
                elif isinstance(
                    a,
                    lt.torrent_error_alert
                    | lt.file_error_alert
                    | lt.listen_failed_alert
                    | lt.fastresume_rejected_alert,
                ):
                    self._errors.append(a.message())

    # ------------------------------------------------------------------ API

    def connect(self, host: str, port: int) -> None:
        """Have libtorrent open a connection to ``host:port`` (``connect_peer``)."""
        self.handle.connect_peer((host, port))

    def wait_finished(self, timeout: float) -> None:
        """Wait until every wanted piece is here and verified; raise ``TimeoutError``
        with a status dump (and the tail of the peer log) if that takes too long."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.handle.status()
            if st.errc.value():
                raise RuntimeError(f"libtorrent: {st.errc.message()}: {self.status()}")
            if st.is_finished and st.state in (
                lt.torrent_status.finished,
                lt.torrent_status.seeding,
            ):
                return
            if time.monotonic() > deadline:
                tail = self.peer_log()[-40:]
                log = "\n  ".join(tail)
                raise TimeoutError(
                    f"libtorrent not finished after {timeout}s: {self.status()}"
                    + (f"\nlast peer log lines:\n  {log}" if tail else "")
                )
            time.sleep(0.02)

    def status(self) -> dict[str, Any]:
        """A snapshot of the torrent: progress, peers, byte counters, errors."""
        st = self.handle.status()
        self._drain()
        with self._lock:
            errors = list(self._errors)
            failures = self._hash_failures
        if st.errc.value():
            errors.append(st.errc.message())
        return {
            "state": _STATE_NAMES.get(int(st.state), str(st.state)),
            "progress": st.progress,
            "is_finished": st.is_finished,
            "is_seeding": st.is_seeding,
            "num_pieces": st.num_pieces,
            "total_pieces": self.ti.num_pieces(),
            "num_peers": st.num_peers,
            "num_seeds": st.num_seeds,
            "total_download": st.total_download,
            "total_upload": st.total_upload,
            "total_payload_download": st.total_payload_download,
            "total_payload_upload": st.total_payload_upload,
            "total_failed_bytes": st.total_failed_bytes,
            "total_redundant_bytes": st.total_redundant_bytes,
            "hash_failures": failures,
            "errors": errors,
        }

    def peers(self) -> list[dict[str, Any]]:
        """The connected peers: address, client, progress and byte counters."""
        return [
            {
                "ip": p.ip,
                "client": p.client,
                "progress": p.progress,
                "total_download": p.total_download,
                "total_upload": p.total_upload,
            }
            for p in self.handle.get_peer_info()
        ]

    def peer_log(self) -> list[str]:
        """Every ``peer_log_alert`` message so far (only collected with ``log_peer``)."""
        self._drain()
        with self._lock:
            return list(self._log)

    def hash_failures(self) -> int:
        """How many pieces failed their hash check (``hash_failed_alert`` count)."""
        self._drain()
        with self._lock:
            return self._hash_failures

    def suggests_received(self) -> int:
        """How many SUGGEST_PIECE messages libtorrent received (needs ``log_peer``)."""
        return sum(1 for line in self.peer_log() if "<== SUGGEST_PIECE" in line)

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> list[str]:
        """Wait until ``count`` peer log lines contain ``text`` (needs ``log_peer``);
        return those lines, or raise ``TimeoutError`` with the tail of the log."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.peer_log() if text in line]
            if len(lines) >= count:
                return lines
            if time.monotonic() > deadline:
                tail = "\n  ".join(self.peer_log()[-40:])
                raise TimeoutError(
                    f"{len(lines)} of {count} peer log lines with {text!r} after {timeout}s;"
                    f" last lines:\n  {tail}"
                )
            time.sleep(0.01)

    def close(self) -> None:
        """Pause the session and shut it down; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._ses.pause()
        self._stop.set()
        self._drainer.join()
        self._drain()
        with self._lock:
            ses, self._ses = self._ses, None
        # Dropping the last reference shuts the session down (there are no trackers to
        # say goodbye to, so this is quick) and frees the port.
        del ses

    def __enter__(self) -> LtPeer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
