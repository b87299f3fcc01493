"""Payload paths resolved beneath the save path at every use: symlinks and hard links
swapped in at each step never lead a write, read, rename, move or delete out of it."""

from __future__ import annotations

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
