#!/usr/bin/env python3
"""How fast does pieced recheck a torrent: every backend, warm or cold, beside libtorrent
and the limits of this machine.

    .venv/bin/python bench/recheck.py --size-mib 2048 --piece-kib 4096 --repeat 3
    .venv/bin/python bench/recheck.py --size-mib 2048 --piece-kib 4096 --repeat 3 --cold

Prints one JSON object on stdout; progress goes to stderr. The payload is ``--size-mib``
MiB in 7 files of odd sizes in nested folders (one of 0 bytes, one of 1 byte), made once
in ``--workdir`` and reused while its size matches; the torrents (``--kinds``, of
``--piece-kib`` pieces) are made by libtorrent. Every entry is a whole process (start-up
and imports count: that is what a user waits for), timed by wall clock, best of
``--repeat``, the runs of all entries interleaved so that drift hits all alike.

Before every run the page cache is set up for it and then checked with ``mincore``:

* *cold*: each file is ``fsync``-ed and dropped with ``POSIX_FADV_DONTNEED``; if more
  than 1 % of the payload's pages are still resident the benchmark stops (it would be measuring
  memory, not the disk);
* *warm*: every file is read once, through the page cache.

The fraction of the payload resident just before each run is in the JSON
(``resident_runs``). The entries:

``read/buffered-2t``, ``read/buffered-4t``, ``read/direct-2t``, ``read/direct-4t`` (always cold)
    The cold read limit: every file read once, 4 MiB at a time, nothing hashed, by 2 or
    4 threads taking the 4 MiB chunks in turn; ``buffered`` is ``os.preadv`` through
    the page cache, ``direct`` is ``O_DIRECT`` into a page-aligned buffer (an anonymous
    mmap), past it. The fastest of the four is *the* read limit.
``raw`` (always warm)
    ``bench/raw_hash.py``: hashlib on every core over mmap'ed files doing only the
    hashing a full check needs (SHA-1 per piece; for hybrid also SHA-256 per 16 KiB leaf
    and the Merkle tree): the hash limit.
``raw_blake3`` (always warm, measured in warm mode only)
    ``bench/raw_hash.py --blake3``: one BLAKE3 per piece on every core, nothing else:
    the limit for a fingerprint recheck.
``libtorrent``
    ``bench/lt_check.py``: a libtorrent session checking the data as operators tune it
    for checking (``hashing_threads`` 2, ``aio_threads`` 4, ``checking_mem_usage`` 4096).
``pieced_verify``
    ``pieced verify TORRENT --data DIR --json``, the offline verifier (mmap, no daemon).
``pieced_recheck_full/BACKEND``
    ``pieced recheck IH --full --json`` against a daemon of that backend
    (``PIECED_BACKEND`` = posix, mmap, direct, uring), one daemon per backend, all
    started by this script with the torrents registered and rechecked once: the
    torrent's own hashes, every byte read from the files. The mmap daemon's runs start
    a second after their cache set-up: the set-up's opens of the files break its leases,
    and it maps a file again only once no one else has it open. Nor can it map a file
    another daemon of the same run keeps open (the posix daemon's descriptors), or that
    its other torrent of the same payload reads (``--kinds v1,hybrid``): measure mmap
    in runs of its own, one kind each (``--backends mmap --kinds v1``), to see it hash
    in place; ``daemon_pread_mib_runs`` says whether it did (0: every byte in place).
``pieced_recheck/BACKEND`` (warm only)
    ``pieced recheck IH --json``: the recheck against the BLAKE3 fingerprints, which must
    all hit.

Each run's CPU seconds (user + system, all threads) are reported next to its wall clock
(``cpu_seconds_runs``; for a daemon recheck that is the client, and the daemon's own are
``daemon_cpu_seconds_runs``): they show how much work each entry does and are what to
trust when the load average says the host was busy. ``ratios`` per kind:
``over_limit`` = time / limit, where the limit is max(read limit, hash limit) when cold
and the hash limit when warm (``raw_blake3`` for the fingerprint recheck), so 1.0 is at
the limit; ``libtorrent_over`` = libtorrent's time / this entry's (> 1: pieced is
faster); ``cpu_over_raw`` = the least CPU seconds of a run of this entry (client and
daemon) over those of ``raw`` (``raw_blake3`` for the fingerprint recheck): the work
done beside the bare hashing, which a busy host does not blur as it does wall clock.
``goals`` says which of the recheck goals a run meets (by wall clock).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import libtorrent as lt  # noqa: E402
from pieced.storage.mapped import MmapStorage  # noqa: E402

from bench.daemon_proc import DaemonProcess, cpu_seconds, read_syscall_bytes  # noqa: E402
from bench.peer_transfer import payload_files  # noqa: E402
from tests.pagecache import drop, page_residency  # noqa: E402
from tests.realtools import TorrentKind, cached_torrent_lt, make_payload  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
SEED = 0
KINDS = ("v1", "hybrid", "v2")
BACKENDS = ("posix", "mmap", "direct", "uring")
#: Stop a cold run when more of the payload than this is still in the page cache.
MAX_COLD_RESIDENT = 0.01
#: Goals, as time over the limit: a cold full recheck within 1.15x of max(read limit,
#: hash limit), a warm one within 1.05x of the hash limit, a warm fingerprint recheck
#: within 1.1x of the bare BLAKE3 pass.
GOALS = {("cold", "pieced_recheck_full"): 1.15, ("warm", "pieced_recheck_full"): 1.05,
         ("warm", "pieced_recheck"): 1.10}

READ_CHILD = """
import json, mmap, os, sys, threading
mode, n, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
chunk = 4 << 20
flags = os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0)
jobs = []
for p in paths:
    fd = os.open(p, flags)
    jobs += [(fd, off) for off in range(0, os.fstat(fd).st_size, chunk)]
got = [0] * n
def work(k):
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT wants
    for fd, off in jobs[k::n]:
        got[k] += os.preadv(fd, [buf], off)
ts = [threading.Thread(target=work, args=(k,)) for k in range(n)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps({"bytes": sum(got)}))
"""


def log(msg: str) -> None:
    print(f"[recheck] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- payload


def payload_spec(size: int, files: int = 0) -> dict[str, int]:
    """A few files of odd sizes, in nested folders, summing to exactly ``size`` bytes.

    Odd sizes so that v1 pieces straddle files and hybrid torrents need pad files; a
    one-byte and an empty file because those are where checkers go wrong. With
    ``files``, that many small files instead (``peer_transfer.payload_files``).
    """
    if files:
        return payload_files(size, files)
    spec = {
        "disc1/track01.bin": size * 5 // 16 + 12_345,
        "disc1/track02.bin": size * 3 // 16 - 4_567,
        "disc2/extras/video.bin": size * 6 // 16 + 999,
        "disc2/extras/one.bin": 1,
        "empty.bin": 0,
        "notes.txt": 7_777,
    }
    rest = size - sum(spec.values())
    if rest <= 0:
        raise SystemExit("--size-mib too small")
    spec["zz_last.bin"] = rest
    return spec


def prepare_payload(workdir: Path, size: int, files: int = 0
                    ) -> tuple[Path, dict[str, int], bool]:
    """Generate (or reuse, if ``manifest.json`` matches) the payload; return its folder."""
    spec = payload_spec(size, files)
    manifest = workdir / "manifest.json"
    want = {"spec": spec, "seed": SEED, "generator": "tests.realtools.make_payload"}
    top = workdir / "data" / "payload"
    on_disk = all(
        (top / rel).is_file() and (top / rel).stat().st_size == n for rel, n in spec.items()
    )
    if on_disk and manifest.exists() and json.loads(manifest.read_text()) == want:
        return top, spec, True
    log(f"generating {size / MiB:.0f} MiB payload in {workdir}")
    shutil.rmtree(workdir / "data", ignore_errors=True)
    shutil.rmtree(workdir / "torrents", ignore_errors=True)
    manifest.unlink(missing_ok=True)
    t = time.perf_counter()
    top = make_payload(workdir / "data", spec, seed=SEED)
    log(f"  generated in {time.perf_counter() - t:.1f}s")
    manifest.write_text(json.dumps(want, indent=1))
    return top, spec, False


# --------------------------------------------------------------------------- page cache

def resident_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all)."""
    pages = page_residency(path)
    return pages.count(1), len(pages)


def resident_fraction(files: list[Path]) -> float:
    counts = [resident_pages(f) for f in files]
    total = sum(n for _, n in counts)
    return sum(r for r, _ in counts) / total if total else 0.0


def evict(files: list[Path]) -> float:
    """Drop ``files`` from the page cache and return the fraction still resident, which
    must be at most ``MAX_COLD_RESIDENT``: ``POSIX_FADV_DONTNEED`` leaves alone pages
    that a process (a daemon of the mmap backend, say) has mapped, and this would then
    measure memory, not the disk.
    """
    frac = drop(*files)
    if frac > MAX_COLD_RESIDENT:
        raise SystemExit(f"eviction failed: {frac:.1%} of the payload is still in the page "
                         "cache after POSIX_FADV_DONTNEED; cold figures would be warm ones")
    return frac


def warm(files: list[Path]) -> float:
    """Read every file once so that the page cache holds it; return the fraction
    resident afterwards (1.0 unless memory is short)."""
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    for f in files:
        with f.open("rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return resident_fraction(files)


# --------------------------------------------------------------------------- processes


def run_timed(cmd: list[str], timeout: float, daemon_pid: int | None = None) -> dict[str, Any]:
    """Run ``cmd``: wall-clock and CPU seconds, exit status and (parsed) stdout.

    CPU seconds are ``RUSAGE_CHILDREN`` deltas (the process and all its threads) and, for
    a request to a daemon, the daemon's own from /proc.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    d0 = cpu_seconds(daemon_pid) if daemon_pid else 0.0
    r0 = read_syscall_bytes(daemon_pid) if daemon_pid else 0
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        return {"error": f"not found: {e.filename}"}
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out: dict[str, Any] = {"seconds": seconds, "cpu_seconds": cpu, "rc": proc.returncode}
    if daemon_pid:
        out["daemon_cpu_seconds"] = cpu_seconds(daemon_pid) - d0
        # (pread's bytes: 0 where the mmap daemon hashed the pages in place)
        out["daemon_pread_mib"] = (read_syscall_bytes(daemon_pid) - r0) >> 20
    try:
        out["json"] = json.loads(proc.stdout)
    except ValueError:
        out["stdout"] = proc.stdout[-2000:]
    out["stderr"] = proc.stderr[-2000:]
    return out


def judge(name: str, run: dict[str, Any], size: int) -> str | None:
    """Why this run does not count (None if it is a clean, all-pieces-good run)."""
    if "error" in run:
        return str(run["error"])
    if run["rc"] != 0:
        tail = (run.get("stderr") or run.get("stdout") or "").strip().splitlines()[-3:]
        return f"exit status {run['rc']}: {' | '.join(tail)}"
    j = run.get("json")
    if not isinstance(j, dict):
        return "did not print a JSON object"
    if name.startswith("read/") and j.get("bytes") != size:
        return f"read {j.get('bytes')} bytes of {size}"
    if name == "libtorrent" and j.get("failed"):
        return f"libtorrent failed pieces {j['failed'][:10]}"
    if j.get("failed_v1") or j.get("failed_v2"):
        return f"failed pieces v1={j.get('failed_v1', [])[:10]} v2={j.get('failed_v2', [])[:10]}"
    if name.startswith("pieced_recheck/") and j.get("fingerprint_hits") != j.get("num_pieces"):
        return f"only {j.get('fingerprint_hits')} of {j.get('num_pieces')} fingerprint hits"
    return None


class Daemon:
    """``pieced run`` of one backend in ``WORKDIR/daemons/BACKEND`` (fresh state, its own
    socket), allowed to read the payload (``PIECED_ROOTS``)."""

    def __init__(self, pieced: Path, workdir: Path, backend: str) -> None:
        self.pieced = pieced
        self.backend = backend
        folder = workdir / "daemons" / backend
        shutil.rmtree(folder, ignore_errors=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIECED_")}
        env |= {"PIECED_BACKEND": backend, "PIECED_ROOTS": str(workdir)}
        self.socket = folder / "var" / "pieced.sock"
        self.proc = DaemonProcess(folder, [str(pieced), "run", "--http-port", "0"], env=env)
        self.proc.start()

    def cli(self, *args: str) -> list[str]:
        return [str(self.pieced), *args, "--json", "--socket", str(self.socket)]

    def register(self, torrent: Path, save_path: Path) -> str:
        """Add ``torrent``, which checks it once (every piece gets its fingerprint)."""
        out = subprocess.run(self.cli("add", str(torrent), "--save-path", str(save_path)),
                             capture_output=True, text=True, check=True, timeout=1800)
        return str(json.loads(out.stdout)["info_hash"])


def start_daemons(pieced: Path, workdir: Path, backends: list[str]) -> dict[str, Daemon]:
    """One daemon per backend; a backend whose daemon does not start is left out."""
    out = {}
    for b in backends:
        try:
            out[b] = Daemon(pieced, workdir, b)
        except RuntimeError as e:
            log(f"the {b} daemon did not start, left out: {str(e).splitlines()[0]}")
    return out


# --------------------------------------------------------------------------- the plan

Entry = tuple[str, list[str], str, int | None]  # name, command, cache state, daemon pid


def plan(args: argparse.Namespace, files: list[Path], save_path: Path,
         torrents: dict[str, Path], daemons: dict[str, Daemon],
         ihs: dict[tuple[str, str], str]) -> dict[str, list[Entry]]:
    """Per group ("limits" and each kind), what to run, in which order, in which cache."""
    py, bench = sys.executable, REPO / "bench"
    mode = "cold" if args.cold else "warm"
    limits: list[Entry] = [
        (f"read/{how}-{n}t", [py, "-c", READ_CHILD, how, str(n), *map(str, files)], "cold", None)
        for how in ("buffered", "direct") for n in (2, 4)
    ]
    groups: dict[str, list[Entry]] = {"limits": limits}
    for kind, t in torrents.items():
        raw = [py, str(bench / "raw_hash.py"), str(t), str(save_path)]
        entries: list[Entry] = [("raw", raw, "warm", None)]
        if not args.cold:
            entries.append(("raw_blake3", [*raw, "--blake3"], "warm", None))
        entries.append(("libtorrent", [py, str(bench / "lt_check.py"), str(t), str(save_path),
                                       "--timeout", str(args.timeout)], mode, None))
        entries.append(("pieced_verify", [str(args.pieced), "verify", str(t), "--data",
                                          str(save_path), "--json"], mode, None))
        for b, d in daemons.items():
            ih = ihs[(b, kind)]
            entries.append((f"pieced_recheck_full/{b}", d.cli("recheck", ih, "--full"), mode,
                            d.proc.pid))
            if not args.cold:
                entries.append((f"pieced_recheck/{b}", d.cli("recheck", ih), mode, d.proc.pid))
        groups[kind] = entries
    return groups


def run_all(groups: dict[str, list[Entry]], files: list[Path], size: int, repeat: int,
            timeout: float) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``repeat`` rounds of every entry, interleaved; each run after its cache set-up."""
    prepare: dict[str, Callable[[list[Path]], float]] = {"cold": evict, "warm": warm}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        g: {name: [] for name, *_ in entries} for g, entries in groups.items()}
    for r in range(repeat):
        for g, entries in groups.items():
            for name, cmd, cache, pid in entries:
                if r and all("error" in x for x in runs[g][name]):
                    continue  # it failed every time so far: do not wait for it again
                resident = prepare[cache](files)
                if cache == "warm" and resident < 0.99:
                    log(f"only {resident:.1%} of the payload stayed in the page cache")
                if name.endswith("/mmap"):
                    # The set-up's opens of the files (and the other tools') took the
                    # mmap daemon's leases, and so its maps, away: it maps a file again
                    # once no one else has it open, tried again after RETRY_SECONDS.
                    # Run at once, it would be measured reading as posix does.
                    time.sleep(MmapStorage.RETRY_SECONDS + 0.2)
                run = run_timed(cmd, timeout, pid)
                why = judge(name, run, size)
                run = {"error": why} if why else run
                run["resident"] = resident
                runs[g][name].append(run)
                shown = f"{run['seconds']:.3f}s" if "seconds" in run else run["error"]
                log(f"run {r + 1}/{repeat} {g:6} {name:28} {cache} "
                    f"(resident {resident:.1%}) {shown}")
    return runs


# --------------------------------------------------------------------------- the report


def summarize(tool_runs: list[dict[str, Any]], size: int) -> dict[str, Any]:
    good = [x for x in tool_runs if "seconds" in x]
    e: dict[str, Any] = {}
    if good:
        best = min(x["seconds"] for x in good)
        e = {"seconds": round(best, 4), "gib_per_s": round(size / GiB / best, 3),
             "runs": [round(x["seconds"], 4) for x in good],
             "cpu_seconds_runs": [round(x["cpu_seconds"], 3) for x in good]}
        if "daemon_cpu_seconds" in good[0]:
            e["daemon_cpu_seconds_runs"] = [round(x["daemon_cpu_seconds"], 3) for x in good]
            e["daemon_pread_mib_runs"] = [x["daemon_pread_mib"] for x in good]
        # The least CPU a run took, the daemon's included: the work, whatever the load.
        e["cpu_seconds"] = round(min(x["cpu_seconds"] + x.get("daemon_cpu_seconds", 0.0)
                                     for x in good), 3)
    e["resident_runs"] = [round(x["resident"], 4) for x in tool_runs]
    errors = sorted({x["error"] for x in tool_runs if "error" in x})
    if errors:
        e["error"] = errors[0] if len(errors) == 1 else errors
    return e


def ratios(entry: dict[str, Any], read_limit: float | None, cold: bool) -> dict[str, Any]:
    """Each figure over its limit, libtorrent over each pieced figure, and the goals."""
    def best(name: str, key: str = "seconds") -> float | None:
        s: float | None = entry.get(name, {}).get(key)
        return s

    hash_limit = best("raw")
    if hash_limit is None or (cold and read_limit is None):
        return {"error": "no limit to compare with"}
    limit = max(read_limit or 0.0, hash_limit) if cold else hash_limit
    mode = "cold" if cold else "warm"
    out: dict[str, Any] = {"limit_seconds": round(limit, 4), "over_limit": {},
                           "cpu_over_raw": {}, "libtorrent_over": {}, "goals": {}}
    lt_s = best("libtorrent")
    for name in entry:
        s = best(name)
        if s is None or name.startswith("raw"):
            continue
        base = best("raw_blake3") if name.startswith("pieced_recheck/") else limit
        if base:
            out["over_limit"][name] = round(s / base, 3)
        raw = "raw_blake3" if name.startswith("pieced_recheck/") else "raw"
        cpu, raw_cpu = best(name, "cpu_seconds"), best(raw, "cpu_seconds")
        if cpu and raw_cpu:
            out["cpu_over_raw"][name] = round(cpu / raw_cpu, 3)
        if lt_s and name != "libtorrent":
            out["libtorrent_over"][name] = round(lt_s / s, 3)
        goal = GOALS.get((mode, name.split("/")[0]))
        if goal and base:
            out["goals"][name] = {"goal": goal, "ratio": round(s / base, 3),
                                  "met": s / base <= goal}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cold", action="store_true", help="evict the payload before every run")
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--piece-kib", type=int, default=4096)
    ap.add_argument("--kinds", default="v1,hybrid", help="comma-separated: v1, hybrid, v2")
    ap.add_argument("--files", type=int, default=0,
                    help="that many small files (0: a few large ones)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="daemon backends")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "recheck")
    ap.add_argument("--pieced", type=Path, default=REPO / ".venv" / "bin" / "pieced")
    ap.add_argument("--timeout", type=float, default=1800, help="per process, seconds")
    args = ap.parse_args()
    args.pieced = args.pieced.absolute()  # the daemons run in folders of their own
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        raise SystemExit(f"--kinds: choose from {', '.join(KINDS)}")
    load_start = os.getloadavg()
    if load_start[0] > 0.5:
        log(f"load average is {load_start[0]:.2f}: something else is running, expect noise")
    size = args.size_mib * MiB
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir.resolve()

    content, spec, reused = prepare_payload(workdir, size, args.files)
    save_path = content.parent
    files = [content / rel for rel in spec]
    torrents = {k: cached_torrent_lt(workdir, content, args.piece_kib * 1024,
                                     cast(TorrentKind, k)) for k in kinds}
    py = sys.executable
    startup = min(run_timed([py, "-c", "pass"], 60).get("seconds", float("nan")) for _ in range(3))
    warm(files)
    daemons = start_daemons(args.pieced, workdir, args.backends.split(","))
    try:
        ihs = {(b, k): d.register(t, save_path) for b, d in daemons.items()
               for k, t in torrents.items()}
        log(f"daemons up and torrents registered: {', '.join(daemons)}")
        groups = plan(args, files, save_path, torrents, daemons, ihs)
        runs = run_all(groups, files, size, args.repeat, args.timeout)
    finally:
        for d in daemons.values():
            d.proc.stop()

    limits = {name: summarize(r, size) for name, r in runs.pop("limits").items()}
    fastest = min((v["seconds"], k) for k, v in limits.items() if "seconds" in v) \
        if any("seconds" in v for v in limits.values()) else None
    results: dict[str, Any] = {}
    for kind, kind_runs in runs.items():
        entry = {name: summarize(r, size) for name, r in kind_runs.items()}
        torrent = torrents[kind]
        results[kind] = {"torrent": str(torrent),
                         "pieces": lt.torrent_info(str(torrent)).num_pieces(),
                         **entry,
                         "ratios": ratios(entry, fastest[0] if fastest else None, args.cold)}
    print(json.dumps({
        "benchmark": "recheck",
        "mode": "cold" if args.cold else "warm",
        "command": " ".join([Path(py).name, *sys.argv]),
        "size_bytes": size,
        "piece_length": args.piece_kib * 1024,
        "repeat": args.repeat,
        "files": spec,
        "payload_reused": reused,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "libtorrent": lt.__version__,
        "platform": platform.platform(),
        "backends": list(daemons),
        "python_startup_seconds": round(startup, 4),
        # The host may be shared: a high load average means noisy figures.
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "read_limit": {"entry": fastest[1], "seconds": round(fastest[0], 4)} if fastest else None,
        "limits": limits,
        "results": results,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
