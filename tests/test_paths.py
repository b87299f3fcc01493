"""Payload paths resolved beneath the save path at every use: symlinks and hard links
swapped in at each step never lead a write, read, rename, move or delete out of it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from pieced.storage.disk import DiskIO
from pieced.storage.errors import BadRequest, PathEscape, PiecedError, StorageIOError
from pieced.storage.metainfo import parse

from tests.realtools import make_payload, make_torrent_lt
from tests.test_disk import Source

FILES = {"a.bin": 70_000, "sub/b.bin": 90_000, "sub/deep/c.bin": 40_000, "z.bin": 50_000}
# Every test runs on each backend (``backend``, see conftest.py) but these, on disabled:
OPENS_NO_PATH = pytest.mark.backends(exclude={
    "disabled": "makes and opens no payload path: nothing beneath the save path is "
                "resolved, so nothing is refused (nor written)"})


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every entry below ``root``: file bytes, or where a symlink points."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture
def setup(tmp_path: Path, backend: str):  # type: ignore[no-untyped-def]
    content = make_payload(tmp_path / "src", FILES, seed=9)
    raw = make_torrent_lt(content, 32768, "v1")
    src = Source(raw, tmp_path / "src")
    canary = make_payload(tmp_path / "canary",
                          {"victim": 4096, "sub/b.bin": 100, "payload/a.bin": 10}, seed=1)
    roots = tmp_path / "roots"
    roots.mkdir()
    # one open file at a time (a mapped one counts): every payload open walks its path
    # again, as after an eviction from the handle pool (an open handle is the file it
    # was: no swap reaches it)
    dio = DiskIO(backend, roots=[roots], cache_bytes=0, max_open_files=1)
    yield raw, src, canary, roots, dio
    dio.close()


def _write(dio: DiskIO, ih: bytes, src: Source, files: set[str]) -> list[PiecedError]:
    """Send the blocks of the pieces of the named files; the refusals they got."""
    errors = []
    idx = {i for i, f in enumerate(src.meta.files) if "/".join(f.path[1:]) in files}
    pieces = {p for i in idx for p in src.layout.file_pieces(i)}
    for p, b, n in src.blocks():
        if p in pieces:
            try:
                dio.write_chunk(ih, p, b, src.read(p, b, n), flush=True)
            except PiecedError as exc:
                errors.append(exc)
    return errors


@OPENS_NO_PATH
def test_swapped_subfolder_and_save_path(setup) -> None:  # type: ignore[no-untyped-def]
    raw, src, canary, roots, dio = setup
    before = _tree(canary)
    dl = roots / "dl"
    ih = dio.register(raw, dl)
    assert not _write(dio, ih, src, {"a.bin", "sub/b.bin"})
    # a subfolder swapped for a symlink out of the roots: refused, nothing written there
    (dl / "payload" / "sub").rename(dl / "payload" / "sub.real")
    (dl / "payload" / "sub").symlink_to(canary / "sub")
    dio.read_chunk(ih, 0, 0, 10, volatile=True)  # another file takes the one open handle
    errors = _write(dio, ih, src, {"sub/b.bin", "sub/deep/c.bin"})
    assert errors and all(isinstance(e, PathEscape) for e in errors), errors
    b_index = next(i for i, f in enumerate(src.meta.files) if f.path[-1] == "b.bin")
    with pytest.raises(PathEscape):  # nor read from there
        dio.read_chunk(ih, src.layout.file_pieces(b_index)[1], 0, 10, volatile=True)
    # the save-path folder itself swapped: the daemon keeps the folder it registered
    (dl / "payload" / "sub").unlink()
    (dl / "payload" / "sub.real").rename(dl / "payload" / "sub")
    dl.rename(roots / "dl.real")
    dl.symlink_to(canary)
    assert not _write(dio, ih, src, {"z.bin"})
    assert (roots / "dl.real" / "payload" / "z.bin").exists()
    # a delete through the swapped save path removes only what is beneath the real one
    dio.unregister(ih, delete_files=True)
    assert _tree(canary) == before
    assert not (roots / "dl.real" / "payload" / "z.bin").exists()


@OPENS_NO_PATH
def test_hard_links_and_symlinked_files_are_refused(setup) -> None:  # type: ignore[no-untyped-def]
    raw, src, canary, roots, dio = setup
    before = _tree(canary)
    dl = roots / "dl"
    ih = dio.register(raw, dl)
    target = dl / "payload" / "a.bin"
    target.parent.mkdir(parents=True)
    os.link(canary / "victim", target)  # planted before the first write
    errors = _write(dio, ih, src, {"a.bin"})
    assert errors and all(isinstance(e, PathEscape) and "hard links" in str(e) for e in errors)
    target.unlink()
    target.symlink_to(canary / "victim")
    errors = _write(dio, ih, src, {"a.bin"})
    assert errors and all(isinstance(e, PathEscape) for e in errors)
    # listed, and told, with an errno as the events document it (EPERM, as a check says)
    listed = dio.status(ih)["errors"]
    assert listed and all(e["errno"] == errno.EPERM for e in listed), listed
    # a symlink to nothing yet: the first write's create (O_EXCL) makes nothing through it
    target.unlink()
    target.symlink_to(canary / "made-through-a-link")
    errors = _write(dio, ih, src, {"a.bin"})
    assert errors and all(isinstance(e, PathEscape) for e in errors)
    assert not (canary / "made-through-a-link").exists()
    # rm --delete-files removes the symlink, never what it points to
    dio.unregister(ih, delete_files=True)
    assert not target.is_symlink() and _tree(canary) == before


@OPENS_NO_PATH
def test_allow_hard_links_seeds_a_hard_linked_library(tmp_path: Path, backend: str) -> None:
    """A library hard-linked into a media folder is seeded as it is when the operator
    allows hard links; symlinks are still refused."""
    content = make_payload(tmp_path / "roots" / "dl", FILES, seed=4)
    raw = make_torrent_lt(content, 32768, "v1")
    media = tmp_path / "roots" / "media"
    for rel in FILES:
        (media / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(content / rel, media / rel)
    strict = DiskIO(backend, roots=[tmp_path / "roots"], cache_bytes=0)
    lenient = DiskIO(backend, roots=[tmp_path / "roots"], cache_bytes=0, max_open_files=1,
                     allow_hard_links=True)
    try:
        ih = strict.register(raw, tmp_path / "roots" / "dl")
        with pytest.raises(PathEscape, match="hard links"):
            strict.read_chunk(ih, 0, 0, 16, volatile=True)
        ih = lenient.register(raw, tmp_path / "roots" / "dl")
        lenient.recheck(ih, full=True)
        meta = parse(raw)
        assert lenient.status(ih)["verified_pieces"] == meta.num_pieces
        last = meta.files[-1].path  # the file of the last piece
        target = tmp_path.joinpath("roots", "dl", *last)
        target.unlink()
        target.symlink_to(media.joinpath(*last[1:]))
        lenient.read_chunk(ih, 0, 0, 16, volatile=True)  # another file takes the one handle
        with pytest.raises(PathEscape):
            lenient.read_chunk(ih, meta.num_pieces - 1, 0, 16, volatile=True)
    finally:
        strict.close()
        lenient.close()


def test_a_rename_to_a_name_no_file_system_holds_is_refused(setup) -> None:  # type: ignore[no-untyped-def]
    """Names over 255 bytes a component or 4,096 in all (what no file system holds) are
    refused: nothing renamed, and the file still written where it was."""
    raw, src, _canary, roots, dio = setup
    ih = dio.register(raw, roots / "dl")
    for name in ("x" * 256, "é" * 128, "/".join(["d"] * 2100), "sub/" + "y" * 300):
        with pytest.raises(BadRequest):
            dio.rename_file(ih, 0, name)
    assert dio.status(ih)["files"][0]["path"] == "payload/a.bin"
    assert not _write(dio, ih, src, {"a.bin"})
    dio.rename_file(ih, 0, "z" * 255)  # at the limit: fine
    assert dio.status(ih)["files"][0]["path"].endswith("z" * 255)


@OPENS_NO_PATH
def test_rename_and_move_never_leave_the_roots(setup) -> None:  # type: ignore[no-untyped-def]
    raw, src, canary, roots, dio = setup
    before = _tree(canary)
    dl = roots / "dl"
    ih = dio.register(raw, dl)
    assert not _write(dio, ih, src, set(FILES))
    (dl / "out").symlink_to(canary)
    with pytest.raises(PathEscape):
        dio.rename_file(ih, 0, "out/stolen.bin")  # into a symlinked folder
    st = dio.status(ih)
    assert st["verified_pieces"] == src.meta.num_pieces
    # a move target that holds a symlink where the torrent's folder goes
    new = roots / "new"
    new.mkdir()
    (new / "payload").symlink_to(canary / "payload")
    with pytest.raises((PathEscape, StorageIOError)):
        dio.move_storage(ih, new)
    assert dio.status(ih)["save_path"] == str(dl)
    assert all((dl / "payload").joinpath(*f.split("/")).exists() for f in FILES)
    assert _tree(canary) == before
    # and a move to a clean target works, with every piece still verified there
    dio.move_storage(ih, roots / "clean")
    assert dio.recheck(ih).ok
    assert _tree(canary) == before


def test_a_save_path_swapped_while_stopped_is_not_loaded(setup, tmp_path: Path, backend: str) -> None:  # type: ignore[no-untyped-def]
    raw, _src, canary, roots, _dio = setup
    state = tmp_path / "state"
    first = DiskIO(backend, roots=[roots], state_dir=state)
    ih = first.register(raw, roots / "dl")
    first.close()
    (roots / "dl").rename(roots / "dl.real")
    (roots / "dl").symlink_to(canary)  # while the daemon was stopped
    again = DiskIO(backend, roots=[roots], state_dir=state)
    assert again.torrents() == []
    assert any(ih.hex() in e and "outside the allowed roots" in e for e in again.load_errors)
    again.close()
    (roots / "dl").unlink()
    (roots / "dl.real").rename(roots / "dl")
    third = DiskIO(backend, roots=[roots], state_dir=state)  # put back: known again, nothing lost
    assert third.torrents() == [ih]
    third.close()


@OPENS_NO_PATH
def test_a_parent_of_the_save_path_swapped_for_a_symlink(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The save path is reached from its root one folder at a time and held open from
    register on: a parent folder swapped for a symlink, before the first write or while
    the daemon is stopped, never leads a write or a read out of the roots. (Swapped while
    it runs, the save path names another folder: what was written to the one held open
    is not taken as verified, and the new one is refused, being reached through a
    symlink.)"""
    raw, src, canary, roots, dio = setup
    ih = dio.register(raw, roots / "a" / "b")
    (roots / "a").rename(roots / "a.real")
    (roots / "a").symlink_to(canary)  # canary/b is there to be written into
    (canary / "b").mkdir()
    before = _tree(canary)
    errors = _write(dio, ih, src, {"a.bin"})
    assert errors and all(isinstance(e, PathEscape) and "symlink" in str(e) for e in errors)
    assert _tree(canary) == before
    assert dio.status(ih)["verified_pieces"] == 0
    # restarted: the folder is looked for again, from the root, and a symlink refused
    state = tmp_path / "state"
    first = DiskIO(dio.backend, roots=[roots], state_dir=state)
    ih = first.register(raw, roots / "c" / "d")
    assert not _write(first, ih, src, {"a.bin"})
    first.close()
    (roots / "c").rename(roots / "c.real")
    other = roots / "other" / "d" / "payload"
    other.mkdir(parents=True)
    (other / "a.bin").write_bytes(b"other")
    (roots / "c").symlink_to(roots / "other")  # inside the roots, but through a symlink
    again = DiskIO(dio.backend, roots=[roots], state_dir=state, cache_bytes=0)
    try:
        with pytest.raises(PathEscape, match="symlink"):
            again.read_chunk(ih, 0, 0, 100, volatile=True)
        with pytest.raises(PathEscape, match="symlink"):
            again.write_chunk(ih, 1, 0, src.read(1, 0, 16384), flush=True)
        assert (other / "a.bin").read_bytes() == b"other"
        assert (roots / "c.real" / "d" / "payload" / "a.bin").read_bytes() == (
            tmp_path / "src" / "payload" / "a.bin").read_bytes()
    finally:
        again.close()


@OPENS_NO_PATH
def test_a_symlink_planted_for_an_empty_file_while_stopped(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str
) -> None:
    """Empty files are made at load: one planted as a symlink is refused and reported,
    and the daemon still starts with every torrent."""
    _, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    state, dl = tmp_path / "state", tmp_path / "dl"
    first = DiskIO(backend, state_dir=state)
    ih = first.register(raw, dl)
    first.close()
    empty = dl / "payload" / "empty"
    empty.unlink()
    empty.symlink_to(tmp_path / "elsewhere")
    again = DiskIO(backend, state_dir=state)
    assert again.torrents() == [ih]
    assert any("symlink" in e for e in again.load_errors), again.load_errors
    assert not (tmp_path / "elsewhere").exists()
    again.close()


@OPENS_NO_PATH
@pytest.mark.parametrize("there", ["folder", "symlink"])
def test_a_register_over_a_folder_or_symlink_where_an_empty_file_goes_is_taken(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str, there: str
) -> None:
    """A folder (or a symlink out of the save path) where the torrent's empty file goes:
    the register was refused (EISDIR), nothing registered, though the file is part of no
    piece (libtorrent adds such a torrent, and ``pieced verify`` finds it whole). It is
    registered, the error listed in its status; its pieces download; nothing is made
    through the symlink, and a start after says it again and loads the torrent."""
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, save)
    state, dl = tmp_path / "state", tmp_path / "dl"
    empty = dl / "payload" / "empty"
    empty.parent.mkdir(parents=True)
    if there == "folder":
        empty.mkdir()
    else:
        empty.symlink_to(tmp_path / "elsewhere")
    dio = DiskIO(backend, state_dir=state)
    try:
        ih = dio.register(raw, dl)
        errors = dio.status(ih)["errors"]
        assert len(errors) == 1 and errors[0]["piece"] is None, errors
        assert "empty" in errors[0]["message"], errors
        for p, b, n in src.blocks():
            dio.write_chunk(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
    finally:
        dio.close()
    assert not (tmp_path / "elsewhere").exists()
    assert empty.is_dir() if there == "folder" else empty.is_symlink()
    if there == "folder":
        (empty / "mine.txt").write_text("the user's")
    again = DiskIO(backend, state_dir=state)
    try:
        assert again.torrents() == [ih]
        assert any("empty" in e for e in again.load_errors), again.load_errors
        assert again.status(ih)["verified_pieces"] == src.meta.num_pieces
        # Removed with its files: the folder (never the torrent's) is left, no error.
        again.unregister(ih, delete_files=True)
        assert again.torrents() == []
    finally:
        again.close()
    left = sorted(str(p.relative_to(dl)) for p in dl.rglob("*"))
    # (a symlink in a file's place is removed, never followed: nothing was made there)
    assert left == (["payload", "payload/empty", "payload/empty/mine.txt"] if there == "folder"
                    else []), left
    assert not (tmp_path / "elsewhere").exists()


@OPENS_NO_PATH
def test_swaps_while_writes_run(setup) -> None:  # type: ignore[no-untyped-def]
    """A writer and a reader run flat out while another thread swaps, over and over, a
    subfolder for a symlink out of the roots and a payload file for a hard link to a
    file outside them: no byte outside the roots changes, whatever the timing."""
    import threading
    import time

    raw, src, canary, roots, dio = setup
    before = _tree(canary)
    dl = roots / "dl"
    ih = dio.register(raw, dl)
    assert not _write(dio, ih, src, set(FILES))  # every file exists and is sized
    sub = dl / "payload" / "sub"
    a_bin = dl / "payload" / "a.bin"
    stop = threading.Event()
    swaps = [0]
    refused: list[PiecedError] = []

    def swapper() -> None:
        import shutil

        real_sub, real_a = dl / "payload" / "sub.real", dl / "payload" / "a.real"
        while not stop.is_set():
            sub.rename(real_sub)
            tmp_link = dl / "payload" / "link.tmp"
            os.symlink(canary / "sub", tmp_link)
            try:
                os.replace(tmp_link, sub)
            except OSError:  # the writer made the folder anew first: no swap this round
                tmp_link.unlink()
            a_bin.rename(real_a)
            os.link(canary / "victim", tmp_link)
            os.replace(tmp_link, a_bin)  # over whatever the writer made there meanwhile
            time.sleep(0.001)
            while True:
                if sub.is_symlink():
                    sub.unlink()
                elif sub.exists():  # the writer made the folder anew in between: drop it
                    shutil.rmtree(sub, ignore_errors=True)
                try:
                    real_sub.rename(sub)
                    break
                except OSError:  # ... and again: once more
                    continue
            os.replace(real_a, a_bin)
            swaps[0] += 1

    def worker() -> None:
        while not stop.is_set():
            for p, b, n in src.blocks():
                try:
                    dio.write_chunk(ih, p, b, src.read(p, b, n), flush=True)
                    dio.read_chunk(ih, p, b, n, volatile=True)
                except PiecedError as exc:
                    refused.append(exc)
            try:  # clears what verified, so blocks are written again
                dio.recheck(ih, full=True)
            except PiecedError as exc:  # its sync reopens a file swapped meanwhile
                refused.append(exc)

    threads = [threading.Thread(target=swapper), threading.Thread(target=worker)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(60)
    assert swaps[0] > 50 and refused, (swaps[0], len(refused))
    assert all(isinstance(e, (PathEscape, StorageIOError)) for e in refused)
    after = _tree(canary)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


@OPENS_NO_PATH
def test_a_file_put_back_is_refused_until_registered_again(setup) -> None:  # type: ignore[no-untyped-def]
    """A payload file deleted (the daemon sees it go) and then put back by someone is not
    used: whatever is found in its place could be a link out of the roots, timed against
    the checks. Registering the torrent again looks at the files afresh."""
    raw, src, _canary, roots, dio = setup
    dl = roots / "dl"
    ih = dio.register(raw, dl)
    assert not _write(dio, ih, src, set(FILES))
    dio.flush_all()
    n = src.meta.num_pieces
    assert dio.status(ih)["verified_pieces"] == n
    a_bin = dl / "payload" / "a.bin"
    kept = a_bin.read_bytes()
    a_bin.unlink()
    with pytest.raises(PiecedError):  # it went: noticed
        dio.read_chunk(ih, 0, 0, 16, volatile=True)
    a_bin.write_bytes(kept)  # put back, by someone else
    errors = _write(dio, ih, src, {"a.bin"})
    assert errors and all(isinstance(e, PathEscape) for e in errors)
    assert not dio.recheck(ih, full=True).ok  # the pieces of a.bin are not taken
    dio.unregister(ih)
    ih = dio.register(raw, dl)
    assert dio.recheck(ih, full=True).ok
    assert dio.status(ih)["verified_pieces"] == n


def _swap_for_symlink(path: Path, to: Path) -> None:
    """Put a symlink in the place of ``path`` (the file itself set aside, never deleted:
    what was written to it is not at its name any more)."""
    path.rename(path.with_name(path.name + ".set-aside"))
    path.symlink_to(to)


@OPENS_NO_PATH
@pytest.mark.parametrize("first", ["flush_all", "committer"])
def test_a_file_swapped_before_its_pieces_are_committed_costs_only_its_pieces(
        tmp_path: Path, backend: str, first: str) -> None:
    """A payload file swapped for a symlink while a verified piece of it waits in the
    group commit, its descriptor closed: the sync finds what pieced refuses at its name,
    so the piece is not made durable there: it is failed, never reported verified, and
    the commits of every other piece go on (the committer thread used to die of it: no
    piece of any torrent was committed again, and flush_all and the stop hung; then a
    piece of another file in the same batch was failed with it), whether a ``flush_all``
    or the committer's own window meets the swap first."""
    import threading

    content = make_payload(tmp_path / "src", FILES, seed=9)
    raw = make_torrent_lt(content, 32768, "v1")
    src = Source(raw, tmp_path / "src")
    other = make_payload(tmp_path / "src2", {"o.bin": 100_000}, seed=4)
    raw2 = make_torrent_lt(other, 32768, "v1")
    src2 = Source(raw2, tmp_path / "src2")
    canary = make_payload(tmp_path / "canary", {"victim": 4096}, seed=1)
    before = _tree(canary)
    roots = tmp_path / "roots"
    roots.mkdir()
    results = []
    window = 0.5 if first == "committer" else 30.0
    dio = DiskIO(backend, roots=[roots], cache_bytes=0, max_open_files=1, sync_window=window,
                 on_piece=results.append)
    try:
        dl = roots / "dl"
        ih = dio.register(raw, dl)
        ih2 = dio.register(raw2, roots / "dl2")
        a_index = next(i for i, f in enumerate(src.meta.files) if f.path[-1] == "a.bin")
        last = src.meta.num_pieces - 1
        # a.bin's first piece, and one of other files only: verified, both waiting to be
        # committed in one batch
        other = next(p for p in range(last) if p not in src.layout.file_pieces(a_index))
        for p, b, n in src.blocks():
            if p in (0, other):
                dio.write_chunk(ih, p, b, src.read(p, b, n))
        p, b, n = src.blocks()[-1]  # the last file opened: a.bin's descriptor closed
        dio.write_chunk(ih, p, b, src.read(p, b, n))
        _swap_for_symlink(dl / "payload" / "a.bin", canary / "victim")
        if first == "flush_all":
            with pytest.raises(StorageIOError, match="symlink"):
                dio.flush_all()
        else:
            deadline = threading.Event()
            for _ in range(100):  # the committer's window passes
                if any(r.piece == 0 for r in results):
                    break
                deadline.wait(0.05)
            dio.flush_all()  # (nothing left for it to meet)
        assert any("symlink" in e["message"] for e in dio.status(ih)["errors"])
        # the swapped file's piece failed, not the other file's beside it in the batch
        assert sorted((r.piece, r.ok) for r in results if r.info_hash == ih) == [
            (0, False), (other, True)]
        have = dio.status(ih)["have"]
        assert [p for p in range(last) if have[p // 8] & (0x80 >> p % 8)] == [other]
        # the other torrent's pieces are committed, and flush_all is a barrier still
        for p, b, n in src2.blocks():
            dio.write_chunk(ih2, p, b, src2.read(p, b, n))
        dio.flush_all(raise_for=[ih2])
        assert dio.status(ih2)["verified_pieces"] == src2.meta.num_pieces
        assert _tree(canary) == before
    finally:
        dio.close()  # returns (it hung when the committer had died)


@pytest.fixture
def other_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A file system of its own (a tmpfs) beneath the roots, for moves across devices."""
    import subprocess

    mnt = tmp_path / "roots" / "other_fs"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@OPENS_NO_PATH
@pytest.mark.parametrize("swap", ["another file", "hard link", "FIFO"])
@pytest.mark.parametrize("where", ["same file system", "another file system"])
def test_a_move_carries_no_file_swapped_in_behind_our_back_as_the_torrents(
        setup, other_fs: Path, backend: str, swap: str, where: str) -> None:  # type: ignore[no-untyped-def]
    """A verified file replaced behind pieced's back (another file's bytes, a hard link
    to a file outside the roots, a FIFO) is refused where it is; a move_storage then
    must not make it the torrent's at the new place. Its pieces start over before the
    move, the rest stay verified; across file systems the copy takes no FIFO (the open
    hung the move, and the stop, for ever) and no hard link (the outside file's bytes
    were copied in, and served as the verified pieces)."""
    raw, src, canary, roots, dio = setup
    before = _tree(canary)
    dl = roots / "dl"
    ih = dio.register(raw, dl)
    assert not _write(dio, ih, src, set(FILES))
    dio.flush_all()
    a_bin = dl / "payload" / "a.bin"
    a_pieces = set(src.layout.file_pieces(0))
    a_bin.rename(dl / "a.set-aside")
    if swap == "another file":
        a_bin.write_bytes(os.urandom(70_000))
    elif swap == "hard link":
        os.link(canary / "victim", a_bin)
    else:
        os.mkfifo(a_bin)
    with pytest.raises(PiecedError):
        dio.read_chunk(ih, 0, 0, 16384)  # refused where it is
    new = (other_fs if where == "another file system" else roots) / "new"
    try:
        dio.move_storage(ih, new)
        moved = True
    except PathEscape:  # the copy across file systems refuses what an open would
        assert where == "another file system" and swap != "another file"
        moved = False
    st = dio.status(ih)
    assert st["save_path"] == str(new if moved else dl)
    have = [bool(st["have"][p // 8] & (0x80 >> p % 8)) for p in range(src.meta.num_pieces)]
    assert [p for p, h in enumerate(have) if not h] == sorted(a_pieces)
    for p in range(src.meta.num_pieces):
        if have[p]:
            size = src.layout.piece_size(p)
            assert dio.read_chunk(ih, p, 0, size) == src.read(p, 0, size)
    assert _tree(canary) == before
    if moved and swap != "another file":  # (pieced may not use it there either)
        with pytest.raises(PiecedError):
            dio.read_chunk(ih, 0, 0, 16384)
    (new / "payload" / "a.bin").unlink(missing_ok=True)
    (dl / "payload" / "a.bin").unlink(missing_ok=True)
    # fetched again (the first writes are told the file went): every piece verified
    for _ in range(3):
        if not _write(dio, ih, src, {"a.bin"}):
            break
    dio.flush_all()
    assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces


def _chattr(flag: str, path: Path) -> None:
    import subprocess

    subprocess.run(["chattr", flag, str(path)], check=True)


def _fds_under(folder: Path) -> list[str]:
    """This process's descriptors of anything at or below ``folder``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == str(folder) or target.startswith(f"{folder}/"):
            out.append(target)
    return out


@OPENS_NO_PATH
def test_a_removal_whose_files_cannot_be_deleted_says_so_with_its_errno(
        setup, backend: str) -> None:  # type: ignore[no-untyped-def]
    """``unregister(delete_files=True)`` where a file cannot be deleted (immutable:
    EPERM; read-only for a daemon not run as root): an I/O error with its errno, the
    other files deleted all the same, nothing of the save folder held open (it raised a
    bare OSError, an internal error on the wire, and kept the save folder's descriptor
    each time)."""
    raw, src, _canary, roots, dio = setup
    dl = roots / "dl"
    ih = dio.register(raw, dl)
    assert not _write(dio, ih, src, set(FILES))
    dio.flush_all()
    stuck = dl / "payload" / "sub" / "b.bin"
    _chattr("+i", stuck)
    try:
        with pytest.raises(StorageIOError) as exc:
            dio.unregister(ih, delete_files=True)
        assert exc.value.errno == errno.EPERM and "b.bin" in str(exc.value)
        assert _fds_under(dl) == []
        assert not (dl / "payload" / "a.bin").exists() and stuck.exists()
        with pytest.raises(PiecedError):
            dio.status(ih)  # removed all the same
    finally:
        _chattr("-i", stuck)


@OPENS_NO_PATH
def test_a_move_over_a_folder_where_a_file_should_be_says_so(
        setup, backend: str) -> None:  # type: ignore[no-untyped-def]
    """A folder (someone else's) stands where a file of the torrent should be: a move
    is undone, saying so; it said "Operation not permitted" (what link() says of a
    folder), which named no cause. The folder and what it holds stay."""
    raw, src, _canary, roots, dio = setup
    dl = roots / "dl"
    folder = dl / "payload" / "sub" / "b.bin"  # (no piece of it is one of a.bin's)
    (folder / "inner").mkdir(parents=True)
    (folder / "inner" / "keep").write_bytes(b"not the torrent's")
    ih = dio.register(raw, dl)
    assert not _write(dio, ih, src, {"a.bin"})
    dio.flush_all()
    before = _tree(dl)
    with pytest.raises(StorageIOError) as exc:
        dio.move_storage(ih, roots / "moved")
    assert exc.value.errno == errno.EISDIR, exc.value
    assert "a folder stands where a file of the torrent should be" in str(exc.value)
    assert str(folder) in str(exc.value) and "undone" in str(exc.value)
    assert _tree(dl) == before and dio.status(ih)["save_path"] == str(dl)


@OPENS_NO_PATH
def test_a_move_undone_across_file_systems_leaves_no_copy_behind(
        setup, other_fs: Path, backend: str) -> None:  # type: ignore[no-untyped-def]
    """A move to another file system whose source file cannot be removed once copied
    (immutable: EPERM) is undone, and the copy goes with it: it was left at the
    destination, in the way of the next move there."""
    raw, src, _canary, roots, dio = setup
    dl = roots / "dl"
    ih = dio.register(raw, dl)
    assert not _write(dio, ih, src, set(FILES))
    dio.flush_all()
    stuck = dl / "payload" / "z.bin"
    _chattr("+i", stuck)
    try:
        with pytest.raises(StorageIOError) as exc:
            dio.move_storage(ih, other_fs / "new")
        assert exc.value.errno == errno.EPERM
        assert [p for p in (other_fs / "new").rglob("*") if p.is_file()] == []
        assert dio.status(ih)["save_path"] == str(dl)
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
    finally:
        _chattr("-i", stuck)
    dio.move_storage(ih, other_fs / "new")  # nothing in the way now
    assert dio.recheck(ih).ok


@pytest.mark.parametrize("backend", ["direct"])
def test_a_fifo_in_a_files_place_is_named_as_such_on_direct(
        setup, backend: str) -> None:  # type: ignore[no-untyped-def]
    """O_DIRECT on a FIFO fails with EINVAL, which the direct backend took for a file
    system without O_DIRECT: a FIFO is refused as what it is."""
    raw, src, _canary, roots, dio = setup
    dl = roots / "dl"
    ih = dio.register(raw, dl)
    assert not _write(dio, ih, src, set(FILES))
    dio.flush_all()
    (dl / "payload" / "a.bin").unlink()
    os.mkfifo(dl / "payload" / "a.bin")
    with pytest.raises(PiecedError, match="not a regular file"):
        dio.hash_piece(ih, 0)


@OPENS_NO_PATH
def test_a_payload_file_of_any_name_is_kept(tmp_path: Path, backend: str) -> None:
    """A payload file named ``.pieced-never-there``: each open of a payload file used to
    unlink that name in the file's folder (to wait for renames under way there), so a
    recheck deleted the torrent's own file, and failed its pieces every time."""
    content = make_payload(tmp_path / "src", {"x/.pieced-never-there": 40_000,
                                              "x/data.bin": 60_000}, seed=21)
    raw = make_torrent_lt(content, 16384, "v1")
    dio = DiskIO(backend, roots=[tmp_path])
    try:
        ih = dio.register(raw, tmp_path / "src")
        for _ in range(2):
            r = dio.recheck(ih, full=True)
            assert r.ok, (r.failed_v1, r.failed_v2)
        assert (content / "x" / ".pieced-never-there").stat().st_size == 40_000
    finally:
        dio.close()


def test_a_save_path_in_a_loop_of_symlinks_is_refused_with_its_errno(tmp_path: Path) -> None:
    """Python names a loop of symlinks met while resolving a path with a RuntimeError,
    which register and move_storage let through: "internal error", logged as a bug."""
    content = make_payload(tmp_path / "src", {"a.bin": 20_000}, seed=22)
    raw = make_torrent_lt(content, 16384, "v1")
    (tmp_path / "loop").symlink_to("loop")
    dio = DiskIO("posix", roots=[tmp_path])
    try:
        with pytest.raises(StorageIOError, match="loop") as got:
            dio.register(raw, tmp_path / "loop" / "dl")
        assert got.value.errno == errno.ELOOP
        ih = dio.register(raw, tmp_path / "src")
        with pytest.raises(StorageIOError, match="loop"):
            dio.move_storage(ih, tmp_path / "loop")
        assert dio.recheck(ih).ok
    finally:
        dio.close()


def test_a_refused_register_removes_the_folders_it_made_never_through_a_symlink(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two registers of one torrent race; the loser removes the empty folders it made
    for its save path. It removed them by name: a parent swapped meanwhile for a
    symlink to a folder outside the roots made it remove the folders of the same names
    there. (The moment is made here by hand: the other register wins, and the parent is
    swapped, while the loser makes its folders.)"""
    import threading

    import pieced.storage.disk as disk

    content = make_payload(tmp_path / "src", {"a.bin": 20_000}, seed=23)
    raw = make_torrent_lt(content, 16384, "v1")
    roots = tmp_path / "roots"
    (roots / "y").mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / "n" / "pB").mkdir(parents=True)  # empty, as the loser's would be
    dio = DiskIO("posix", roots=[roots])
    made = disk.make_storage

    def slow_make(*args, **kwargs):  # type: ignore[no-untyped-def]
        storage = made(*args, **kwargs)
        if "pB" in str(args[2]):
            root = storage.root.root

            def then_swap(create: bool = False) -> int:
                fd = root(create)  # root/y/n/pB made (walked, no symlink)
                t = threading.Thread(target=dio.register, args=(raw, roots / "x" / "pA"))
                t.start()
                t.join()  # the other register wins meanwhile
                (roots / "y").rename(roots / "y.real")
                (roots / "y").symlink_to(outside)
                return fd

            storage.root.root = then_swap
        return storage

    monkeypatch.setattr(disk, "make_storage", slow_make)
    try:
        with pytest.raises(PiecedError, match="already"):
            dio.register(raw, roots / "y" / "n" / "pB")
        assert (outside / "n" / "pB").is_dir()  # outside: left alone
        assert (roots / "y.real" / "n" / "pB").is_dir()  # (unreachable now: left)
    finally:
        dio.close()
