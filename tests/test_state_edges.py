"""Edges of the durable state, each found by a hunt: a flag taken for its truthiness
deleted payload files, a removal the state folder refused answered OK (and the torrent
came back, trusted), and a symlink, FIFO or folder in a payload file's place (or a save
folder swapped for a symlink) kept its pieces verified across a crash."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import bencodepy
import pytest
from pieced.protocol.client import Client
from pieced.storage.disk import DiskIO
from pieced.storage.errors import BadRequest, StorageIOError

from tests.conftest import STORES_NOTHING, Daemon
from tests.realtools import make_payload, make_torrent_lt
from tests.test_disk import Source, fill
from tests.test_state import wait_reverified


def _verified(st: dict) -> set[int]:
    return {p for p in range(len(st["have"]) * 8) if st["have"][p >> 3] & (0x80 >> (p & 7))}


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# -- 1. 0/1 flags: anything else is BAD_REQUEST, and changes nothing ------------------------

BAD_FLAGS = ["0", b"no", [0], "false", 2, -1, {"x": 1}]


def test_a_flag_other_than_0_or_1_is_refused_and_changes_nothing(
        daemon: Daemon, tmp_path: Path) -> None:
    """``unregister`` tested ``delete_files`` for its truthiness: a client that sent it
    as "0", b"no", [0] or "false" had the torrent's payload files deleted, with OK. Every
    0/1 flag of every op (``delete_files``, ``recheck``'s ``full``, ``status``'s
    ``files``) is now 0 or 1, or BAD_REQUEST before anything is done."""
    content = make_payload(tmp_path / "src", {"a.bin": 40000, "sub/b.bin": 20000}, seed=3)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    n = src.meta.num_pieces
    dl = tmp_path / "dl"
    with Client(daemon.socket) as c:
        ih = c.register(raw, dl)
        for p, b, size in src.blocks():
            c.write_chunk(ih, p, b, src.read(p, b, size))
        c.wait_writes()
        c.flush_all()
        files = _files_under(dl)
        assert len(files) == 2 and c.status(ih)["verified_pieces"] == n
        for value in BAD_FLAGS:
            for op, key in [("unregister", "delete_files"), ("recheck", "full"),
                            ("status", "files")]:
                with pytest.raises(BadRequest, match=f"'{key}' must be 0 or 1"):
                    c._call(op, ih=ih, **{key: value})
            assert _files_under(dl) == files, value
            assert [x["ih"] for x in c.torrents()] == [ih], value
            assert c.status(ih)["verified_pieces"] == n, value
        # 0 and 1 (and the client's booleans) still do what they say.
        assert "files" not in c._call("status", ih=ih, files=0)
        assert "files" in c._call("status", ih=ih, files=1)
        assert c._call("recheck", ih=ih, full=1)["verified"] == n
        assert c._call("recheck", ih=ih, full=0)["verified"] == n
        c._call("unregister", ih=ih, delete_files=0)
        assert [x["ih"] for x in c.torrents()] == [] and _files_under(dl) == files
        ih = c.register(raw, dl)
        c.recheck(ih)
        c.unregister(ih, delete_files=True)
        assert [x["ih"] for x in c.torrents()] == [] and _files_under(dl) == set()


# -- 2. a removal the state folder refuses changes nothing -----------------------------------

@contextlib.contextmanager
def _unchangeable(folder: Path, how: str) -> Iterator[None]:
    """``folder`` (a torrent's state folder) as a state file system gone read-only, or
    a folder the daemon may not change, leaves it: the kernel refuses every change."""
    if how == "immutable":
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        if done.returncode:
            pytest.skip(f"chattr +i: {done.stderr.decode().strip()}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:  # a read-only bind mount of the folder over itself
        done = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
        if done.returncode:
            pytest.skip(f"mount --bind: {done.stderr.decode().strip()}")
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("how", ["immutable", "read-only"])
def test_a_removal_the_state_folder_refuses_fails_and_changes_nothing(
        tmp_path: Path, backend: str, how: str) -> None:
    """``unregister`` (the files kept) answered OK when the torrent's state folder could
    not be changed (the record left where it was, deleted in place as it could be:
    nothing); after the restart the torrent was back, its old bitfield trusted, and
    pieces whose bytes the user had changed since were served as verified. It is now
    IO_ERROR, nothing changed (as with ``delete_files``); once the folder can be changed
    the removal goes through, and the restart does not bring the torrent back."""
    content = make_payload(tmp_path / "src", {"a.bin": 40000, "sub/b.bin": 70000}, seed=5)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    n = src.meta.num_pieces
    state = tmp_path / "state"
    dio = DiskIO(backend, state_dir=state)
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)
    dio.flush_all()
    assert dio.status(ih)["verified_pieces"] == n
    folder = state / "torrents" / ih.hex()
    with _unchangeable(folder, how):
        with pytest.raises(StorageIOError, match="unregister") as exc:
            dio.unregister(ih)
        assert exc.value.errno in (errno.EPERM, errno.EROFS, errno.EBUSY, errno.EACCES)
        assert dio.torrents() == [ih] and dio.status(ih)["verified_pieces"] == n
        assert dio.read_chunk(ih, n - 1, 0, 10) == src.read(n - 1, 0, 10)
    assert sorted(os.listdir(state / "torrents")) == [ih.hex()]
    dio.unregister(ih)
    assert dio.torrents() == []
    dio.close()
    again = DiskIO(backend, state_dir=state)
    try:
        assert again.torrents() == [] and again.load_errors == []
        assert os.listdir(state / "torrents") == []
        assert (tmp_path / "dl" / "payload" / "a.bin").exists()  # (the files were kept)
    finally:
        again.close()


# -- 3. what the daemon would not open as a payload file is gone at the start ----------------

def _tamper(kind: str, dl: Path, elsewhere: Path) -> None:
    small = dl / "payload" / "e.bin"
    if kind == "symlink":  # a symlink longer than the 10-byte file it replaces
        target = elsewhere / "e.bin"
        target.write_bytes(b"Z" * 10)
        small.unlink()
        os.symlink(target, small)
    elif kind == "fifo":
        small.unlink()
        os.mkfifo(small)
    elif kind == "folder":  # (4096 bytes, to lstat)
        small.unlink()
        small.mkdir()
    elif kind == "save folder symlink":  # the save folder swapped for a symlink to a copy
        shutil.copytree(dl, elsewhere / "dl")
        (elsewhere / "dl" / "payload" / "sub" / "b.bin").write_bytes(bytes(3 * 16384 + 5))
        shutil.rmtree(dl)
        os.symlink(elsewhere / "dl", dl)
    else:
        raise AssertionError(kind)


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("stop", ["crash", "clean"])
@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder", "save folder symlink"])
def test_what_is_not_a_regular_file_beneath_the_save_path_loses_its_pieces_at_the_start(
        tmp_path: Path, backend: str, kind: str, stop: str) -> None:
    """After a kill -9, a start compared only the sizes of payload files, taken with
    lstat and no look at the file's type: a symlink (its own length), or a folder, in
    the place of a small file, or a save folder swapped for a symlink (files reached
    through it), kept their pieces verified, which the daemon then refused to read (it
    opens nothing through a symlink). Such files count as gone now: their pieces are
    not verified; the rest stay."""
    content = make_payload(tmp_path / "src", {"a.bin": 3 * 16384, "e.bin": 10,
                                              "sub/b.bin": 3 * 16384 + 5}, seed=9)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    n = src.meta.num_pieces
    dl, elsewhere = tmp_path / "dl", tmp_path / "elsewhere"
    elsewhere.mkdir()
    dio = DiskIO(backend, state_dir=tmp_path / "state", sync_window=0.002)
    ih = dio.register(raw, dl)
    fill(dio, ih, src)
    dio.flush_all()
    st = dio.status(ih)
    assert st["verified_pieces"] == n
    t = dio.torrent(ih)
    small = next(f["index"] for f in st["files"] if f["path"].endswith("e.bin"))
    touched = set(t.layout.file_pieces(small))
    state = tmp_path / "state"
    if stop == "crash":  # what a kill -9 leaves: every append was fdatasync'ed
        shutil.copytree(tmp_path / "state", tmp_path / "crashed")
        state = tmp_path / "crashed"
    dio.close()
    _tamper(kind, dl, elsewhere)
    again = DiskIO(backend, state_dir=state)
    try:
        end = time.monotonic() + 30
        while (st := again.status(ih))["reverifying_pieces"] and time.monotonic() < end:
            time.sleep(0.01)
        have = _verified(st)
        if kind == "save folder symlink":
            assert have == set(), sorted(have)
        else:
            assert not have & touched, sorted(have & touched)
            if stop == "crash":  # (a clean stop's stamps put the others in doubt too)
                assert have == set(range(n)) - touched
        for p in have:  # every piece still said verified is served, with its bytes
            size = t.layout.piece_size(p)
            assert again.read_chunk(ih, p, 0, size) == src.read(p, 0, size), p
    finally:
        again.close()


# -- 4. the state folder's own entries, of the wrong kind ------------------------------------

def test_a_file_where_a_torrents_state_folder_goes_does_not_block_its_register(
        tmp_path: Path) -> None:
    """A file (or symlink) in the place of a torrent's folder in the state folder: the
    start skips it with a warning, as it should, but every register of that torrent then
    failed with "register: Not a directory", naming nothing. It is the daemon's own
    place: the register clears it and records the torrent there."""
    content = make_payload(tmp_path / "src", 4 * 16384, seed=31)
    raw = make_torrent_lt(content, 16384, "v1")
    state = tmp_path / "state"
    dio = DiskIO("posix", state_dir=state)
    ih = dio.register(raw, tmp_path / "dl")
    dio.close()
    entry = state / "torrents" / ih.hex()
    shutil.rmtree(entry)
    entry.write_bytes(b"not a folder")
    again = DiskIO("posix", state_dir=state)
    try:
        assert again.torrents() == []
        assert any(ih.hex() in e for e in again.load_errors), again.load_errors
        assert again.register(raw, tmp_path / "dl") == ih
    finally:
        again.close()
    third = DiskIO("posix", state_dir=state)
    try:
        assert third.torrents() == [ih] and not third.load_errors, third.load_errors
    finally:
        third.close()


def test_a_folder_where_the_clean_stop_mark_goes_is_cleared(tmp_path: Path) -> None:
    """The mark a clean stop leaves in the state folder, replaced by a folder while the
    daemon was down: no stop could write the mark from then on (every SIGTERM ended in
    exit 2, the socket left behind), so every start after was taken for one after a
    crash. The start clears it, and the next stop is clean."""
    state = tmp_path / "state"
    DiskIO("posix", state_dir=state).close()
    mark = state / "clean"
    assert mark.is_file()
    mark.unlink()
    mark.mkdir()
    (mark / "x").write_bytes(b"")
    again = DiskIO("posix", state_dir=state)
    assert not again.load_errors, again.load_errors
    again.close()
    assert mark.is_file()
    third = DiskIO("posix", state_dir=state)
    try:
        assert third.state is not None and third.state.was_clean
    finally:
        third.close()


def test_a_removal_whose_record_cannot_be_set_aside_durably_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A removal that keeps the files sets the torrent's record aside (a rename), the
    step that commits it: when the rename could not be made durable (the fsync of the
    state folder failed), the removal was answered done all the same, and a power cut
    could bring the torrent back with its old bitfield. It is refused now, the record
    left where it was."""
    from pieced.storage import resume

    content = make_payload(tmp_path / "src", 4 * 16384, seed=41)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    state = tmp_path / "state"
    dio = DiskIO("posix", state_dir=state)
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)
    dio.flush_all()
    real = resume.fsync_dir

    def failing(path: Path) -> None:
        if path == state / "torrents":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(path)

    monkeypatch.setattr(resume, "fsync_dir", failing)
    try:
        with pytest.raises(StorageIOError, match="cannot be changed"):
            dio.unregister(ih)
        assert dio.torrents() == [ih]
        assert not [p for p in (state / "torrents").iterdir() if p.name.startswith(".")]
    finally:
        monkeypatch.undo()
        dio.close()
    again = DiskIO("posix", state_dir=state)
    try:
        assert again.torrents() == [ih]
        assert _verified(again.status(ih)) == set(range(4))
    finally:
        again.close()


def test_a_register_the_state_folder_refuses_names_where(tmp_path: Path) -> None:
    """A register whose record the state folder would not take (a folder made
    immutable here; not writable by the service user, in the field) failed with
    "register: Permission denied", naming nothing to look at."""
    content = make_payload(tmp_path / "src", 2 * 16384, seed=42)
    raw = make_torrent_lt(content, 16384, "v1")
    state = tmp_path / "state"
    dio = DiskIO("posix", state_dir=state)
    subprocess.run(["chattr", "+i", str(state / "torrents")], check=True)
    try:
        with pytest.raises(StorageIOError) as refused:
            dio.register(raw, tmp_path / "dl")
        assert str(state / "torrents") in str(refused.value), refused.value
        assert dio.torrents() == []
    finally:
        subprocess.run(["chattr", "-i", str(state / "torrents")], check=True)
        dio.close()


# -- damaged state folders: each damage costs its torrent at most ----------------------------

def _load_as(uid: int, state: Path) -> dict:
    """Fork, drop to ``uid``, start a DiskIO on ``state``: what it loaded and said."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drops its rights, reports through the pipe, os._exit
        code = 1
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            d = DiskIO("posix", state_dir=state)
            got = {"torrents": [ih.hex() for ih in d.torrents()], "errors": d.load_errors,
                   "stats_errors": d.stats()["load_errors"]}
            d.close()
            code = 0
        except BaseException as exc:
            got = {"raised": repr(exc)}
        finally:
            with contextlib.suppress(BaseException):
                os.write(w, json.dumps(got).encode())
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    return dict(json.loads(out))


def test_a_torrent_state_folder_that_cannot_be_read_skips_that_torrent_alone() -> None:
    """A torrent's state folder the daemon's user may not read (EACCES; EIO on a bad
    disk) stopped the whole start: every torrent was out of reach. It is skipped, said,
    and the others load."""
    root = Path(tempfile.mkdtemp(prefix="pieced-unreadable-"))
    try:
        root.chmod(0o755)  # (the user the daemon runs as must reach the files)
        ihs = []
        dio = DiskIO("posix", state_dir=root / "state")
        for k in range(2):
            content = make_payload(root / f"src{k}", {f"f{k}.bin": 40000}, seed=k)
            ih = dio.register(make_torrent_lt(content, 16384, "v1"), root / f"src{k}")
            assert dio.recheck(ih).ok
            ihs.append(ih)
        dio.close()
        subprocess.run(["chown", "-R", "65534:65534", str(root / "state")], check=True)
        (root / "state" / "torrents" / ihs[0].hex()).chmod(0)
        got = _load_as(65534, root / "state")
        assert got.get("torrents") == [ihs[1].hex()], got
        assert got["stats_errors"] == got["errors"]
        assert got["torrents"] == [ihs[1].hex()]
        assert any(ihs[0].hex() in e and "Permission denied" in e for e in got["errors"]), got
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def _record(path: Path) -> dict:
    return dict(bencodepy.decode(path.read_bytes()))


def test_a_record_whose_checksum_lost_its_name_is_damaged(tmp_path: Path) -> None:
    """A bit flipped in the name of a resume record's checksum (``crc`` read ``crb``)
    took the checksum away: the record passed as one of a version that wrote none, and
    a bit flipped in its bitfield too made a piece with nothing on disk verified. A
    record holding the info hash (written since the checksums) must have its checksum."""
    content = make_payload(tmp_path / "src", {"a.bin": 5 * 16384}, seed=8)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    state = tmp_path / "state"
    dio = DiskIO("posix", state_dir=state)
    ih = dio.register(raw, tmp_path / "dl")
    for p, b, n in src.blocks():
        if p != 3:  # (piece 3 never comes)
            dio.write_chunk(ih, p, b, src.read(p, b, n))
    dio.flush_all()
    assert _verified(dio.status(ih)) == {0, 1, 2, 4}
    dio.close()
    resume = state / "torrents" / ih.hex() / "resume"
    record = _record(resume)
    record[b"crb"] = record.pop(b"crc")
    record[b"have"] = bytes([record[b"have"][0] | 0x10])  # piece 3 said verified
    resume.write_bytes(bencodepy.encode(record))
    again = DiskIO("posix", state_dir=state)
    try:
        st = wait_reverified(again, ih)
        assert _verified(st) == {0, 1, 2, 4}
    finally:
        again.close()


def test_a_folder_where_the_check_under_way_mark_goes_is_cleared(tmp_path: Path) -> None:
    """A folder named ``checking`` in a torrent's state folder (a restore, a tool) made
    every recheck fail, at every start ("record the check under way: Is a directory"),
    and pieces in doubt could never be found again. It is cleared, as the clean stop's
    mark is."""
    content = make_payload(tmp_path / "src", {"a.bin": 4 * 16384}, seed=9)
    raw = make_torrent_lt(content, 16384, "v1")
    state = tmp_path / "state"
    dio = DiskIO("posix", state_dir=state)
    ih = dio.register(raw, tmp_path / "src")
    dio.close()
    (state / "torrents" / ih.hex() / "checking" / "x").mkdir(parents=True)
    again = DiskIO("posix", state_dir=state)
    try:
        wait_reverified(again, ih)
        r = again.recheck(ih)
        assert r.ok and _verified(again.status(ih)) == set(range(4))
        assert not (state / "torrents" / ih.hex() / "checking").exists()
    finally:
        again.close()


@pytest.mark.parametrize("name", ["resume", "journal.9", "metainfo.torrent"])
def test_a_state_file_far_larger_than_its_torrent_needs_is_not_read_whole(
        tmp_path: Path, name: str) -> None:
    """A state file grown past what its torrent can need (a bad disk, a tool run amok)
    was read whole: 2 GB of it took the daemon to 4 GB, or a start to 97 s. It is read no
    further than its torrent can need: damage, the torrent's pieces found again (a
    metainfo that large: the torrent skipped, said)."""
    content = make_payload(tmp_path / "src", {"a.bin": 4 * 16384}, seed=10)
    raw = make_torrent_lt(content, 16384, "v1")
    state = tmp_path / "state"
    dio = DiskIO("posix", state_dir=state, metainfo_limits={"max_bytes": 1 << 20})
    ih = dio.register(raw, tmp_path / "src")
    assert dio.recheck(ih).ok
    dio.close()
    path = state / "torrents" / ih.hex() / name
    with open(path, "ab") as f:
        f.truncate(max(path.stat().st_size if path.exists() else 0, 1) + (512 << 20))  # sparse
    tracemalloc.start()
    try:
        again = DiskIO("posix", state_dir=state, metainfo_limits={"max_bytes": 1 << 20})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    try:
        assert peak < 128 << 20, f"{peak} bytes at the peak"  # (not 1 GiB: 512 MiB read, joined)
        if name == "metainfo.torrent":
            assert again.torrents() == []
            assert any(ih.hex() in e and "larger than max_metainfo_bytes" in e
                       for e in again.load_errors), again.load_errors
        else:
            wait_reverified(again, ih)
            assert _verified(again.status(ih)) == set(range(4))
    finally:
        again.close()


def test_what_the_start_could_not_use_is_in_the_stats(tmp_path: Path) -> None:
    """A torrent the start skipped (its state damaged) was said in the log alone: to a
    client, and on the HTTP page, it just was not there. ``stats`` says it, and ``pieced
    stats`` prints it."""
    content = make_payload(tmp_path / "src", {"a.bin": 40000}, seed=12)
    raw = make_torrent_lt(content, 16384, "v1")
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "src")
            assert c.stats()["load_errors"] == []
    finally:
        assert d.stop() == 0
    (tmp_path / "var" / "torrents" / ih.hex() / "metainfo.torrent").write_bytes(b"d4:infoi1ee")
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            [said] = c.stats()["load_errors"]
            assert said.startswith(f"state of torrent {ih.hex()} skipped: ")
        out = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", "stats", "--socket",
                              str(d.socket)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and f"at the start         {said}" in out.stdout, out
    finally:
        assert d.stop() == 0


def test_a_location_record_the_daemon_wrote_large_loads_again(tmp_path: Path) -> None:
    """The location record holds every file's new name: 300 files renamed to paths of
    3.6 KB made it 1.1 MB, past the limit first put on it (1 MiB), and the next start
    skipped the torrent, its verified pieces with it. Its limit is what the torrent's
    files can need."""
    n = 300
    content = make_payload(tmp_path / "src", {f"f{i:03d}.bin": 1000 + i for i in range(n)},
                           seed=13)
    raw = make_torrent_lt(content, 16384, "v1")
    state = tmp_path / "state"
    dio = DiskIO("posix", state_dir=state)
    ih = dio.register(raw, tmp_path / "src")
    assert dio.recheck(ih).ok
    deep = "/".join(["d" * 200] * 17)  # 3.4 KB of folders
    for i in range(n):
        dio.rename_file(ih, i, f"{deep}/f{i:03d}-{'x' * 150}.bin")
    verified = _verified(dio.status(ih))
    dio.close()
    assert (state / "torrents" / ih.hex() / "location").stat().st_size > 1 << 20
    again = DiskIO("posix", state_dir=state)
    try:
        assert again.torrents() == [ih], again.load_errors
        assert _verified(wait_reverified(again, ih)) == verified
    finally:
        again.close()
