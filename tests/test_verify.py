"""Offline verification (``pieced verify``) on real torrents with chosen corruptions:
exactly the right v1 and v2 pieces fail, and libtorrent's own recheck agrees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pieced.storage.metainfo import parse

from tests.conftest import UnreadableFs, sparse_zero_torrent
from tests.realtools import (
    corrupt,
    lt_recheck,
    make_payload,
    make_torrent_lt,
    make_torrent_mktorrent,
    make_torrent_transmission,
)

PIECED = [sys.executable, "-m", "pieced.daemon.cli"]


def run_verify(torrent: bytes, save: Path, tmp: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    tfile = tmp / "t.torrent"
    tfile.write_bytes(torrent)
    proc = subprocess.run(
        [*PIECED, "verify", str(tfile), "--data", str(save), "--json", *extra],
        capture_output=True, text=True, timeout=120,
    )
    return proc.returncode, json.loads(proc.stdout) if proc.stdout else {}, proc.stderr


def torrent_offset(raw: bytes, rel: str, offset: int) -> int:
    meta = parse(raw)
    for f in meta.files:
        if "/".join(f.path[1:]) == rel or "/".join(f.path) == rel:
            return f.offset + offset
    raise KeyError(rel)


CORRUPTIONS = [("a.bin", 0), ("a.bin", 199_999), ("sub/exact", 65535), ("sub/deeper/plus1", 65536), ("one", 0)]


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
@pytest.mark.parametrize("piece_length", [16384, 65536, 262144, 4 * 1024 * 1024])
def test_libtorrent_torrents(tmp_path: Path, odd_payload: tuple[Path, Path], kind: Any, piece_length: int) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, piece_length, kind)
    meta = parse(raw)
    rc, out, err = run_verify(raw, save, tmp_path)
    assert rc == 0, err
    assert out["failed_v1"] == ([] if kind != "v2" else None)
    assert out["failed_v2"] == ([] if kind != "v1" else None)
    assert out["num_pieces"] == meta.num_pieces and out["piece_length"] == piece_length
    assert out["info_hash_v1"] == (meta.info_hash_v1.hex() if meta.info_hash_v1 else None)
    if kind != "v1":
        assert len(out["info_hash_v2"]) == 64

    expect: set[int] = set()
    for rel, off in CORRUPTIONS:
        corrupt(content / rel, off)
        expect.add(torrent_offset(raw, rel, off) // piece_length)
    rc, out, _ = run_verify(raw, save, tmp_path)
    assert rc == 1
    if kind != "v2":
        assert out["failed_v1"] == sorted(expect)
    if kind != "v1":
        assert out["failed_v2"] == sorted(expect)
    lt_have = lt_recheck(raw, save)
    assert [p for p, ok in enumerate(lt_have) if not ok] == sorted(expect)


@pytest.mark.parametrize("maker", [make_torrent_mktorrent, make_torrent_transmission])
def test_other_makers(tmp_path: Path, maker: Any) -> None:
    files = {"x/a.bin": 100_000, "b": 1, "c/d/e": 32768, "f": 32769}
    content = make_payload(tmp_path / "save", files, seed=11)
    raw = maker(content, 32768)
    rc, out, err = run_verify(raw, tmp_path / "save", tmp_path)
    assert rc == 0, err
    corrupt(content / "c/d/e", 5)
    rc, out, _ = run_verify(raw, tmp_path / "save", tmp_path)
    piece = torrent_offset(raw, "c/d/e", 5) // 32768
    assert rc == 1 and out["failed_v1"] == [piece] and out["failed_v2"] is None
    assert [p for p, ok in enumerate(lt_recheck(raw, tmp_path / "save")) if not ok] == [piece]


def test_missing_and_short_files_fail_their_pieces(tmp_path: Path, odd_payload: tuple[Path, Path]) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 16384, "hybrid")
    (content / "sub/exact").unlink()
    with open(content / "z/tail.dat", "r+b") as f:
        f.truncate(100)
    rc, out, _ = run_verify(raw, save, tmp_path)
    assert rc == 1
    lt_failed = [p for p, ok in enumerate(lt_recheck(raw, save)) if not ok]
    assert out["failed_v1"] == out["failed_v2"] == lt_failed
    assert len(lt_failed) == 4 + 1


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_a_file_cut_short_fails_the_pieces_libtorrent_fails(
    tmp_path: Path, kind: Any
) -> None:
    """A file one byte short, or cut to half: only the pieces that need its missing bytes
    fail, the ones libtorrent fails (before, every piece of the file failed)."""
    content = make_payload(tmp_path / "save", {"a.bin": 200_000, "b.bin": 70_000}, seed=9)
    raw = make_torrent_lt(content, 65536, kind)
    for size in (199_999, 100_000):
        with open(content / "a.bin", "r+b") as f:
            f.truncate(size)
        rc, out, _ = run_verify(raw, tmp_path / "save", tmp_path)
        assert rc == 1
        lt_failed = [p for p, ok in enumerate(lt_recheck(raw, tmp_path / "save")) if not ok]
        assert 0 not in lt_failed
        for key in ("failed_v1", "failed_v2"):
            assert out[key] in (None, lt_failed), (key, out[key], lt_failed)


@pytest.mark.parametrize("where", ["file", "folder", "loop"])
def test_a_symlink_fails_its_pieces_as_in_the_daemon(tmp_path: Path, where: str) -> None:
    """A symlink in a payload file's place, or a folder's, even to the right bytes: the
    daemon never goes through one, and fails those pieces; this command followed it and
    called them good (a symlink loop made it stop, exit 2). Now it says what the
    daemon's check says."""
    import shutil

    from pieced.storage.disk import DiskIO

    content = make_payload(tmp_path / "save", {"a.bin": 70_000, "sub/b.bin": 200_000,
                                               "sub/deeper/c.bin": 1000}, seed=11)
    raw = make_torrent_lt(content, 65536, "v1")
    shutil.copytree(content, tmp_path / "copy")
    if where == "file":
        (content / "sub/b.bin").unlink()
        (content / "sub/b.bin").symlink_to(tmp_path / "copy/sub/b.bin")
    elif where == "folder":
        shutil.rmtree(content / "sub")
        (content / "sub").symlink_to(tmp_path / "copy/sub")
    else:
        (content / "sub/b.bin").unlink()
        (content / "sub/b.bin").symlink_to(content / "sub/b.bin")
    rc, out, _ = run_verify(raw, tmp_path / "save", tmp_path)
    dio = DiskIO("posix", roots=[tmp_path])
    try:
        daemon = dio.recheck(dio.register(raw, tmp_path / "save"), full=True)
    finally:
        dio.close()
    assert rc == 1 and out["failed_v1"] == daemon.failed_v1 == [1, 2, 3, 4], (out, daemon)
    # What was not read is named, with why: the symlink itself, not each folder below it
    if where == "folder":
        assert out["refused"] == [{"path": str(content / "sub"), "reason":
                                   "not a folder (a symbolic link, not followed, or a file)"}]
    else:
        assert out["refused"] == [{"path": str(content / "sub/b.bin"),
                                   "reason": "a symbolic link: not followed"}]


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_a_fifo_in_place_of_a_file_fails_its_pieces_and_hangs_nothing(
        tmp_path: Path, kind: str) -> None:
    """A FIFO where a payload file should be: opening it to read waited for a writer for
    ever, so `pieced verify` and a daemon's recheck never ended (and the daemon could not
    stop). Now its pieces fail, the others verify, and both end. A Unix socket there
    (its open says ENXIO) made `pieced verify` give up on the whole check (exit 2)."""
    import os
    import socket

    content = make_payload(tmp_path / "save", {"a.bin": 200_000, "b.bin": 70_000}, seed=10)
    raw = make_torrent_lt(content, 65536, "v1")
    (tmp_path / "t.torrent").write_bytes(raw)
    (content / "a.bin").unlink()
    if kind == "fifo":
        os.mkfifo(content / "a.bin")
    else:
        bound = socket.socket(socket.AF_UNIX)
        bound.bind(str(content / "a.bin"))
        bound.close()
    rc, out, _ = run_verify(raw, tmp_path / "save", tmp_path)  # (a time limit of its own)
    assert rc == 1 and out["failed_v1"] == [0, 1, 2, 3]  # a.bin is in the first four
    assert out["refused"] == [{"path": str(content / "a.bin"), "reason": "not a regular file"}]
    recheck = (  # the storage engine's recheck, in a process of its own: it may hang
        "import sys; from pathlib import Path; from pieced.storage.disk import DiskIO\n"
        "d = DiskIO('posix'); raw = Path(sys.argv[1]).read_bytes()\n"
        "ih = d.register(raw, Path(sys.argv[2]))\n"
        "print(d.recheck(ih, full=True).failed_v1, [e['errno'] for e in d.status(ih)['errors']])\n"
        "d.close()\n")
    r = subprocess.run([sys.executable, "-c", recheck, str(tmp_path / "t.torrent"),
                        str(tmp_path / "save")], capture_output=True, text=True, timeout=60)
    # the pieces fail, and why is said: a FIFO is no regular file (EPERM), a socket's
    # open says ENXIO (which said nothing before)
    told = "[6]" if kind == "socket" else "[1]"
    assert r.returncode == 0 and r.stdout.strip() == f"[0, 1, 2, 3] {told}", (r.stdout, r.stderr)


def test_control_characters_in_names_are_shown_escaped(tmp_path: Path) -> None:
    """A torrent named with an escape sequence (one that clears a terminal and sets its
    title): printed as is, it did so. Its control characters are now ``_`` in the name,
    as libtorrent stores it, and none reaches the terminal."""
    name = "evil\x1b[2J\x1b]0;pwned\x07name"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / name).write_bytes(bytes(range(256)) * 100)
    raw = make_torrent_lt(tmp_path / "src" / name, 16384, "v1")
    (tmp_path / "t.torrent").write_bytes(raw)
    (tmp_path / "save").mkdir()
    (tmp_path / "save" / "evil_[2J_]0;pwned_name").write_bytes(bytes(range(256)) * 100)
    proc = subprocess.run([*PIECED, "verify", str(tmp_path / "t.torrent"), "--data",
                           str(tmp_path / "save")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    assert "evil_[2J_]0;pwned_name" in proc.stdout, proc.stdout


def test_bad_input_exit_2(tmp_path: Path, odd_payload: tuple[Path, Path]) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 16384, "v1")
    rc, _, err = run_verify(b"not bencode", save, tmp_path)
    assert rc == 2 and "not canonical bencode" in err
    rc, _, err = run_verify(raw, tmp_path / "nowhere", tmp_path)
    assert rc == 2 and "not a directory" in err
    proc = subprocess.run([*PIECED, "verify", str(tmp_path / "missing.torrent"), "--data", str(save)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    proc = subprocess.run([*PIECED, "verify"], capture_output=True, text=True)
    assert proc.returncode == 2
    # not a file: refused at once (a device or a FIFO was read, or waited on, for ever)
    proc = subprocess.run([*PIECED, "verify", "/dev/zero", "--data", str(save)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr


@pytest.mark.parametrize("as_json", [True, False])
def test_a_report_that_cannot_be_written_is_bad_input_not_a_failed_piece(
        tmp_path: Path, odd_payload: tuple[Path, Path], as_json: bool) -> None:
    """Standard output on a full disk: a traceback and exit 1, which says a piece
    failed, where every piece verifies."""
    save, content = odd_payload
    tfile = tmp_path / "t.torrent"
    tfile.write_bytes(make_torrent_lt(content, 16384, "v1"))
    with open("/dev/full", "w") as full:
        proc = subprocess.run([*PIECED, "verify", str(tfile), "--data", str(save),
                               *(["--json"] if as_json else [])],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("pieced verify: cannot write the report to standard output: "
                           "No space left on device\n"), proc.stderr


def test_an_error_after_a_progress_bar_starts_a_line_of_its_own(
        capsys: pytest.CaptureFixture[str]) -> None:
    """An error of a recheck cut short was written on after the bar's last draw:
    '...417.9 MiB/spieced recheck: the check was cut short'."""
    import io

    from pieced.daemon.cli import ProgressBar, _complain

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = ProgressBar(10, 16384, stream=Terminal())
    bar(3, 10)
    _complain("pieced recheck: cut short")
    bar(10, 10)  # (a finished bar ends its own line)
    _complain("pieced recheck: after")
    assert capsys.readouterr().err == "\npieced recheck: cut short\npieced recheck: after\n"


def test_human_output_and_quiet_progress(tmp_path: Path, odd_payload: tuple[Path, Path]) -> None:
    save, content = odd_payload
    tfile = tmp_path / "t.torrent"
    tfile.write_bytes(make_torrent_lt(content, 16384, "hybrid"))
    corrupt(content / "a.bin", 20000)
    proc = subprocess.run([*PIECED, "verify", str(tfile), "--data", str(save)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "v1 failed: 1\n" in proc.stdout and "v2 failed: 1\n" in proc.stdout
    assert proc.stderr == ""  # piped: no progress bar


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_names_with_control_and_invisible_characters_are_where_libtorrent_puts_them(
        tmp_path: Path, kind: str) -> None:
    """File names holding control characters (made ``_``) or invisible ones that change
    how a name reads (left out: ``in<RLO>gpj.exe`` is ``ingpj.exe``) are stored where
    libtorrent stores them. They were kept as they came: a download libtorrent made
    verified as all failed, and the spoofing names reached the disk."""
    import shutil

    import libtorrent as lt
    from pieced.storage.metainfo import parse

    files = {"a\x01.bin": 20000, "in\u202egpj.exe": 30000, "z\u200b/t\tab": 5,
             "\u200b\u200c": 9, "x\x85y": 3, "ok": 40000}
    content = make_payload(tmp_path / "src", files, seed=4)
    raw = make_torrent_lt(content, 16384, kind)
    fs = lt.torrent_info(raw).layout()
    theirs = [fs.file_path(i) for i in range(fs.num_files())
              if not fs.file_flags(i) & lt.file_storage.flag_pad_file]
    assert ["/".join(f.path) for f in parse(raw).files if not f.pad] == theirs
    assert not any(c in p for p in theirs for c in "\x01\t\x85\u202e\u200b")
    # the payload laid out as libtorrent's download of it is: every piece verifies
    by_size = {size: name for name, size in files.items()}
    for i in range(fs.num_files()):
        if fs.file_flags(i) & lt.file_storage.flag_pad_file:
            continue
        dst = tmp_path / "lt" / fs.file_path(i)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(content / by_size[fs.file_size(i)], dst)
    code, out, err = run_verify(raw, tmp_path / "lt", tmp_path)
    assert code == 0, (out, err)


def test_a_file_the_disk_cannot_read_is_said_so_not_taken_for_bad_pieces(
    tmp_path: Path, unreadable_fs: UnreadableFs
) -> None:
    """A payload file with a block the disk cannot read (EIO): its pieces are neither good
    nor bad, nothing can be said of them. Read through a map, the page was SIGBUS: the
    command died without a word (exit status 135). It names the file and the error, and
    exits 2."""
    content = make_payload(unreadable_fs.mount / "save", {"a.bin": 40 * 65536}, seed=3)
    raw = make_torrent_lt(content, 65536, "v1")
    needle = (content / "a.bin").read_bytes()[7 * 65536 + 4096 : 7 * 65536 + 4160]
    rc, _, err = run_verify(raw, unreadable_fs.mount / "save", tmp_path)
    assert rc == 0, err
    unreadable_fs.spoil(needle)
    rc, out, err = run_verify(raw, unreadable_fs.mount / "save", tmp_path)
    assert rc == 2 and out == {}
    assert "a.bin" in err and "Input/output error" in err


def test_a_file_cut_short_during_the_check_fails_pieces_and_kills_nothing(tmp_path: Path) -> None:
    """Another process truncates a payload file while `pieced verify` reads it: the pieces
    past its new end fail (exit 1). Read through a map, the first page past the end was
    SIGBUS, and the command died without a word."""
    import time

    raw = sparse_zero_torrent(tmp_path / "save", "zeros.bin", 4 << 20, 768)  # 3 GiB
    tfile = tmp_path / "t.torrent"
    tfile.write_bytes(raw)
    proc = subprocess.Popen(
        [*PIECED, "verify", str(tfile), "--data", str(tmp_path / "save"), "--json",
         "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    cut_while_running = proc.poll() is None
    with open(tmp_path / "save" / "zeros.bin", "r+b") as f:
        f.truncate(1 << 20)  # (within the first piece: every piece fails, wherever it got)
    stdout, stderr = proc.communicate(timeout=120)
    assert cut_while_running, "the check ended before the file was cut: make it longer"
    assert proc.returncode == 1, stderr
    failed = json.loads(stdout)["failed_v1"]
    assert failed and failed[-1] == 767


def test_a_hybrid_without_piece_layers_says_which_pieces_v2_did_not_check(
        tmp_path: Path, odd_payload: tuple[Path, Path]) -> None:
    """A hybrid .torrent without ``piece layers``: its pieces of files over one piece
    are checked by v1 alone, and the report said "v2 failed: none" as if v2 had passed
    them. It names them as not checked by v2 now; a bad byte still fails by v1."""
    import bencodepy

    save, content = odd_payload
    full = make_torrent_lt(content, 16384, "hybrid")
    top = bencodepy.decode(full)
    assert top.pop(b"piece layers")
    bare = bencodepy.encode(top)
    meta = parse(bare)
    unchecked = meta.v2_unchecked()
    assert unchecked and parse(full).v2_unchecked() == []
    assert all(meta.v2_piece(p) is None for p in unchecked)
    assert all(meta.v2_piece(p) is not None for p in set(range(meta.num_pieces)) - set(unchecked))
    code, report, _ = run_verify(bare, save, tmp_path)
    assert code == 0 and report["failed_v2"] == [] and report["unchecked_v2"] == unchecked
    code, report, _ = run_verify(full, save, tmp_path)
    assert code == 0 and report["unchecked_v2"] == []
    proc = subprocess.run([*PIECED, "verify", str(tmp_path / "t.torrent"), "--data", str(save)],
                          capture_output=True, text=True, timeout=120)
    assert "v2 not checked" not in proc.stdout
    (tmp_path / "t.torrent").write_bytes(bare)
    proc = subprocess.run([*PIECED, "verify", str(tmp_path / "t.torrent"), "--data", str(save)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "v2 not checked" in proc.stdout, proc.stdout
    corrupt(content / "a.bin", 5)
    code, report, _ = run_verify(bare, save, tmp_path)
    assert code == 1 and report["failed_v1"] == [unchecked[0]] and report["failed_v2"] == []


def test_verify_takes_the_limits_the_daemon_is_given(tmp_path: Path) -> None:
    """A daemon given a larger max_piece_length (or max_pieces...) registers a torrent
    of 128 MiB pieces; ``pieced verify`` kept its built-in limits and refused the same
    .torrent (exit 2). It now reads them as the daemon does: from its config file
    (``--config``, or $PIECED_CONFIG) and the PIECED_* variables."""
    import os

    raw = sparse_zero_torrent(tmp_path / "dl", "zeros.bin", 128 << 20, 2)
    t = tmp_path / "big.torrent"
    t.write_bytes(raw)
    cmd = [sys.executable, "-m", "pieced.daemon.cli", "verify", str(t), "--data",
           str(tmp_path / "dl"), "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIECED_")}
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "over the limit" in refused.stderr, refused.stderr
    for how in ("env", "file"):
        if how == "env":
            run_env = {**env, "PIECED_MAX_PIECE_LENGTH": str(256 << 20)}
            extra: list[str] = []
        else:
            (tmp_path / "pieced.toml").write_text(f"max_piece_length = {256 << 20}\n")
            run_env, extra = env, ["--config", str(tmp_path / "pieced.toml")]
        proc = subprocess.run(cmd + extra, capture_output=True, text=True, env=run_env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["num_pieces"] == 2 and out["failed_v1"] == [] and out["ok"]
    # The daemon's other settings are not this command's business: neither an unknown
    # variable, nor an HTTP address off loopback whose token is elsewhere, refuse it.
    other = {**env, "PIECED_MAX_PIECE_LENGTH": str(256 << 20), "PIECED_FROBNICATE": "1",
             "PIECED_HTTP_HOST": "0.0.0.0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=other, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "bad.toml").write_text("max_piece_lenght = 1\n")
    bad = subprocess.run([*cmd, "--config", str(tmp_path / "bad.toml")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "max_piece_lenght" in bad.stderr, bad.stderr


def test_a_check_reads_every_folder_from_the_save_path_it_opened(tmp_path: Path) -> None:
    """The folder above the save path is swapped for a symlink to another copy of the
    torrent's tree while a check runs. Each folder of the torrent was reached by opening
    the save path again by its name: the folders met after the swap were read from the
    other tree. The save path is now opened once, and every folder walked to from it."""
    from pieced.storage.layout import Layout
    from pieced.storage.verify import FolderFiles

    spec = {"a/x.bin": 32768, "b/y.bin": 32768}
    content = make_payload(tmp_path / "top" / "data", spec, seed=31)
    make_payload(tmp_path / "other" / "data", spec, seed=32)  # same names, other bytes
    raw = make_torrent_lt(content, 16384, "v1")
    meta = parse(raw)
    save = tmp_path / "top" / "data"
    files = FolderFiles(meta, save, Layout(meta))
    try:
        first, second = (Path(*meta.files[i].path) for i in (0, 1))  # in their order
        got = memoryview(bytearray(16384))
        files.read(0, 0, got)  # the first file's folder: the save path opened
        assert bytes(got) == (save / first).read_bytes()[:16384]
        (tmp_path / "top").rename(tmp_path / "top.real")
        (tmp_path / "top").symlink_to(tmp_path / "other")
        files.read(2, 0, got)  # the second file's folder, first met after the swap
        assert bytes(got) == (tmp_path / "top.real" / "data" / second).read_bytes()[:16384]
    finally:
        files.close()


@pytest.mark.parametrize("how", ["reader_gone", "stdout_closed", "stderr_closed"])
def test_the_verdict_survives_an_output_that_cannot_be_written(tmp_path: Path, how: str) -> None:
    """`pieced verify ... | head -c 60` of data with failed pieces exited 0 once head had
    gone (the broken pipe taken for the end of a good run): a pipeline with pipefail
    was told the data was good. Started with standard error closed, the progress bar
    raised (exit 1, "a piece fails", of good data); with standard output closed, the
    report did. The verdict is the exit status whatever becomes of the report; a report
    that cannot be written at all is exit 2."""
    import os

    content = make_payload(tmp_path / "src", 300_000, seed=21)
    raw = make_torrent_lt(content, 16384, "v1")
    tfile = tmp_path / "t.torrent"
    tfile.write_bytes(raw)
    data = bytearray((content / "payload.bin").read_bytes() if content.is_dir()
                     else content.read_bytes())
    save = tmp_path / "save"
    good = tmp_path / "src"
    (save / "payload.bin").parent.mkdir(parents=True)
    data[5] ^= 0xFF
    (save / "payload.bin").write_bytes(data)
    cmd = [*PIECED, "verify", str(tfile), "--json"]
    if how == "reader_gone":
        r, w = os.pipe()
        os.close(r)
        try:
            proc = subprocess.run([*cmd, "--data", str(save)], stdout=w,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
        finally:
            os.close(w)
        assert proc.returncode == 1, proc.stderr  # a piece fails
        assert "Traceback" not in proc.stderr
        return
    fd = 1 if how == "stdout_closed" else 2
    results = {}
    for name, folder in (("good", good), ("bad", save)):
        proc = subprocess.run([*cmd, "--data", str(folder)], capture_output=True, text=True,
                              timeout=120, preexec_fn=lambda: os.close(fd))
        results[name] = proc.returncode
        assert "Traceback" not in proc.stdout + proc.stderr
    if how == "stderr_closed":
        assert results == {"good": 0, "bad": 1}
    else:
        assert results == {"good": 2, "bad": 2}  # no report could be written


@pytest.mark.parametrize("kind", ["v1", "hybrid"])
def test_a_torrent_of_more_files_than_descriptors_is_checked_whole(tmp_path: Path,
                                                                    kind: str) -> None:
    """1,200 files, checked with 100 descriptors allowed (soft and hard): every file was
    kept open, and the check stopped half way on EMFILE, saying the files could not be
    read (exit 2, as for bad input). Files are now closed least recently used first;
    every piece is checked, the one corrupted fails and only it."""
    import resource

    spec = {f"d{i % 7}/f{i}.bin": 1000 + 37 * i for i in range(1200)}
    content = make_payload(tmp_path / "dl", spec, seed=33)
    raw = make_torrent_lt(content, 16384, kind)
    meta = parse(raw)
    tfile = tmp_path / "t.torrent"
    tfile.write_bytes(raw)
    rel = f"d{1000 % 7}/f1000.bin"
    corrupt(content / rel, 5)
    bad = torrent_offset(raw, rel, 5) // meta.piece_length

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))

    proc = subprocess.run([*PIECED, "verify", str(tfile), "--data", str(tmp_path / "dl"),
                           "--json"], capture_output=True, text=True, timeout=300,
                          preexec_fn=few_descriptors)
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["failed_v1"] == [bad]
    assert out["num_pieces"] == meta.num_pieces


def test_a_file_opened_while_every_other_is_being_read_is_not_closed_under_its_reader(
        tmp_path: Path) -> None:
    """Every file kept open at the bound is in use by a read, and one more read opens its
    file: making room closed the file just opened (the others were in use), and its
    reader read a closed descriptor, or another file's once its number was reused
    (``pieced verify --threads 64`` under a low descriptor limit: exit 2 on EBADF, good
    pieces failed). A file in use is never closed; the bound is met again once the
    reads are done."""
    from pieced.storage.layout import Layout
    from pieced.storage.verify import FolderFiles

    spec = {f"f{i}.bin": 20000 + i for i in range(12)}
    content = make_payload(tmp_path / "dl", spec, seed=34)
    raw = make_torrent_lt(content, 16384, "v1")
    meta = parse(raw)
    files = FolderFiles(meta, tmp_path / "dl", Layout(meta), descriptors=40)
    try:
        bound = files._open_files
        assert bound < len(spec)
        held = [files._fd(i) for i in range(bound + 1)]  # reads in flight, one past it
        for i, fd in enumerate(held):
            assert fd is not None
            want = (tmp_path / "dl" / Path(*meta.files[i].path)).read_bytes()[:64]
            assert os.pread(fd, 64, 0) == want  # open, and still that file
        for i in range(bound + 1):
            files._done(i)
        for i in range(bound + 1, len(spec)):  # others opened: unused ones make room
            files._fd(i)
            files._done(i)
        assert files._opened <= bound
    finally:
        files.close()
