#!/usr/bin/env python3
"""How fast does pieced recheck a torrent, next to libtorrent and the physical limit?

Prints one JSON object on stdout (progress goes to stderr). For a payload of
``--size-mib`` MiB (a few files of odd sizes in nested folders, generated once into
``--workdir`` and reused while the size matches) it makes a v1 and a hybrid torrent with
libtorrent, warms the page cache, and then times, as whole processes (wall clock, best
of ``--repeat``, runs of the contenders interleaved so drift hits all alike):

``raw``
    ``bench/raw_hash.py``: hashlib on every core over zero-copy mmap slices, doing the
    hashing a full check needs (SHA-1 per piece; for hybrid also SHA-256 per 16 KiB
    leaf and the merkle tree up to the piece layer) and nothing else: the limit.
``libtorrent``
    A Python process running ``tests.realtools.lt_recheck`` (a real libtorrent session,
    ``hashing_threads`` = cores), which must find every piece good.
``pieced``
    ``.venv/bin/pieced verify TORRENT --data SAVE_PATH --json``, which must exit 0 with
    empty ``failed_v1`` / ``failed_v2``. A missing or failing command is recorded as an
    ``error`` for that entry rather than stopping the benchmark.
``pieced_recheck_full`` / ``pieced_recheck``
    ``pieced recheck IH [--full] --json`` against a daemon this script starts (state in
    ``WORKDIR/var``) with the torrent registered and rechecked once, so that every piece
    has its BLAKE3 fingerprint: ``--full`` hashes with the torrent's own hashes, the
    plain recheck with the fingerprints (it must report a fingerprint hit per piece).
``raw_blake3``
    ``bench/raw_hash.py --blake3``: one BLAKE3 per piece over mmap slices on every core,
    the limit for ``pieced_recheck``.

Whole processes, because that is what a user waits for: interpreter start-up and
imports count (``python_startup_seconds`` in the output says how much of that is bare
CPython). Each run's CPU time (user + system, all threads) is reported next to its wall
clock: it shows how much work each contender does, and it is what to trust when the
load average shows the host was busy. Ratios: ``fraction_of_raw`` = raw / tool time (1.0 = at the limit) and
``libtorrent_over_pieced`` = libtorrent / pieced time (> 1: pieced is faster).
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
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import libtorrent as lt  # noqa: E402

from tests.realtools import cached_torrent_lt, make_payload  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
Kind = Literal["v1", "hybrid"]
KINDS: tuple[Kind, ...] = ("v1", "hybrid")
SEED = 0

LT_CHILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.realtools import lt_recheck
have = lt_recheck(Path(sys.argv[2]).read_bytes(), Path(sys.argv[3]), float(sys.argv[4]))
bad = [i for i, ok in enumerate(have) if not ok]
print(json.dumps({"pieces": len(have), "failed": bad}))
sys.exit(1 if bad or not have else 0)
"""


def log(msg: str) -> None:
    print(f"[recheck] {msg}", file=sys.stderr, flush=True)


def payload_spec(size: int) -> dict[str, int]:
    """A few files of odd sizes, in nested folders, summing to exactly ``size`` bytes.

    Odd sizes so that v1 pieces straddle files and hybrid torrents need pad files; a
    one-byte and an empty file because those are where checkers go wrong.
    """
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


def prepare_payload(workdir: Path, size: int) -> tuple[Path, dict[str, int], bool]:
    """Generate (or reuse, if ``manifest.json`` matches) the payload; return its folder."""
    spec = payload_spec(size)
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


def prepare_torrent(workdir: Path, content: Path, piece_length: int, kind: Kind) -> Path:
    """Make (or reuse) the ``kind`` torrent; torrents are deleted with the payload."""
    log(f"{kind} torrent, {piece_length // 1024} KiB pieces")
    return cached_torrent_lt(workdir, content, piece_length, kind)


def warm_cache(content: Path) -> float:
    """Read every file once so that every contender starts from a warm page cache."""
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    t = time.perf_counter()
    for f in sorted(p for p in content.rglob("*") if p.is_file()):
        with f.open("rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t


def run_timed(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run ``cmd``, returning wall-clock and CPU seconds, exit status and (parsed) stdout.

    CPU seconds (user + system, all threads) are taken from ``RUSAGE_CHILDREN`` deltas:
    on a shared host they stay put when a neighbour steals a core and wall clock does not.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
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
    try:
        out["json"] = json.loads(proc.stdout)
    except ValueError:
        out["stdout"] = proc.stdout[-2000:]
    out["stderr"] = proc.stderr[-2000:]
    return out


def judge(tool: str, run: dict[str, Any]) -> str | None:
    """Why this run does not count (None if it is a clean, all-pieces-good run)."""
    if "error" in run:
        return str(run["error"])
    j = run.get("json")
    if run["rc"] != 0:
        tail = (run.get("stderr") or run.get("stdout") or "").strip().splitlines()[-3:]
        return f"exit status {run['rc']}: {' | '.join(tail)}"
    if not isinstance(j, dict):
        return "did not print a JSON object"
    if tool == "libtorrent" and j.get("failed"):
        return f"libtorrent failed pieces {j['failed'][:10]}"
    if tool != "libtorrent" and (j.get("failed_v1") or j.get("failed_v2")):
        return f"failed pieces v1={j.get('failed_v1', [])[:10]} v2={j.get('failed_v2', [])[:10]}"
    if tool == "pieced_recheck" and j.get("fingerprint_hits") != j.get("num_pieces"):
        return f"only {j.get('fingerprint_hits')} of {j.get('num_pieces')} fingerprint hits"
    return None


class BenchDaemon:
    """``pieced run`` in ``workdir`` (which holds the payload, so it is an allowed root),
    with fresh state, on a private socket; the torrents are registered and rechecked once
    so that every piece has a fingerprint."""

    def __init__(self, pieced: Path, workdir: Path, save_path: Path) -> None:
        shutil.rmtree(workdir / "var", ignore_errors=True)
        self.pieced = pieced
        self.socket = workdir / "var" / "pieced.sock"
        self.save_path = save_path
        self.proc = subprocess.Popen(
            [str(pieced), "run", "--http-port", "0"], cwd=workdir,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert self.proc.stdout is not None
        if "listening" not in self.proc.stdout.readline():
            self.proc.kill()
            raise SystemExit("the daemon did not start")

    def cli(self, *args: str) -> list[str]:
        return [str(self.pieced), *args, "--json", "--socket", str(self.socket)]

    def add(self, torrent: Path) -> str:
        out = subprocess.run(self.cli("add", str(torrent), "--save-path", str(self.save_path)),
                             capture_output=True, text=True, check=True, timeout=600)
        ih = str(json.loads(out.stdout)["info_hash"])
        subprocess.run(self.cli("recheck", ih), capture_output=True, check=True, timeout=1800)
        return ih

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--piece-length", type=int, default=MiB, help="bytes (power of two)")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "recheck")
    ap.add_argument("--only", choices=KINDS, help="just this torrent kind")
    ap.add_argument("--pieced", type=Path, default=REPO / ".venv" / "bin" / "pieced")
    ap.add_argument("--timeout", type=float, default=1800, help="per process, seconds")
    args = ap.parse_args()
    kinds = [args.only] if args.only else list(KINDS)
    size = args.size_mib * MiB
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir.resolve()

    content, spec, reused = prepare_payload(workdir, size)
    save_path = content.parent
    torrents = {k: prepare_torrent(workdir, content, args.piece_length, k) for k in kinds}
    warm = warm_cache(content)
    log(f"page cache warmed ({size / GiB / warm:.1f} GiB/s)")

    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        log(f"load average is {load_before[0]:.2f}: something else is running, expect noise")
    py = sys.executable
    startup = min(run_timed([py, "-c", "pass"], 60).get("seconds", float("nan")) for _ in range(3))
    daemon = BenchDaemon(args.pieced, workdir, save_path)
    ihs = {k: daemon.add(t) for k, t in torrents.items()}
    commands: dict[Kind, dict[str, list[str]]] = {
        k: {
            "raw_blake3": [py, str(REPO / "bench" / "raw_hash.py"), str(t), str(save_path),
                           "--blake3"],
            "raw": [py, str(REPO / "bench" / "raw_hash.py"), str(t), str(save_path)],
            "libtorrent": [
                py,
                "-c",
                LT_CHILD,
                str(REPO),
                str(t),
                str(save_path),
                str(args.timeout),
            ],
            "pieced": [str(args.pieced), "verify", str(t), "--data", str(save_path), "--json"],
            "pieced_recheck_full": daemon.cli("recheck", ihs[k], "--full"),
            "pieced_recheck": daemon.cli("recheck", ihs[k]),
        }
        for k, t in torrents.items()
    }
    runs: dict[Kind, dict[str, list[dict[str, Any]]]] = {
        k: {tool: [] for tool in commands[k]} for k in kinds
    }
    for r in range(args.repeat):
        for k in kinds:
            for tool, cmd in commands[k].items():
                if tool.startswith("pieced") and r and any("error" in x for x in runs[k][tool]):
                    continue  # it failed once; do not wait for it again
                # libtorrent leaves the page cache colder behind it (whatever runs next,
                # raw included, takes ~25% longer), so every run starts from a re-warmed one.
                warm_cache(content)
                run = run_timed(cmd, args.timeout)
                why = judge(tool, run)
                if why:
                    run = {"error": why}
                runs[k][tool].append(run)
                shown = f"{run['seconds']:.3f}s" if "seconds" in run else run["error"]
                log(f"run {r + 1}/{args.repeat} {k:6} {tool:10} {shown}")

    daemon.stop()
    results: dict[str, Any] = {}
    for k in kinds:
        ti = lt.torrent_info(torrents[k].read_bytes())
        entry: dict[str, Any] = {"torrent": str(torrents[k]), "pieces": ti.num_pieces()}
        best: dict[str, float] = {}
        for tool, tool_runs in runs[k].items():
            good = [x for x in tool_runs if "seconds" in x]
            ok = [x["seconds"] for x in good]
            errors = sorted({x["error"] for x in tool_runs if "error" in x})
            e: dict[str, Any] = {}
            if ok:
                best[tool] = min(ok)
                e = {
                    "seconds": round(best[tool], 4),
                    "gib_per_s": round(size / GiB / best[tool], 3),
                    "runs": [round(s, 4) for s in ok],
                    "cpu_seconds_runs": [round(x["cpu_seconds"], 4) for x in good],
                }
            if errors:
                e["error"] = errors[0] if len(errors) == 1 else errors
            entry[tool] = e
        for tool in ("libtorrent", "pieced", "pieced_recheck_full"):
            if tool in best and "raw" in best:
                entry[tool]["fraction_of_raw"] = round(best["raw"] / best[tool], 3)
        if "pieced_recheck" in best and "raw_blake3" in best:
            entry["pieced_recheck"]["fraction_of_raw_blake3"] = round(
                best["raw_blake3"] / best["pieced_recheck"], 3)
        for tool in ("pieced", "pieced_recheck_full", "pieced_recheck", "raw_blake3"):
            if "libtorrent" in best and tool in best:
                entry[f"libtorrent_over_{tool}"] = round(best["libtorrent"] / best[tool], 3)
        raw_json = next((x["json"] for x in runs[k]["raw"] if "json" in x), None)
        if raw_json:
            entry["raw"]["in_process_hash_seconds"] = raw_json["hash_seconds"]
        results[k] = entry

    print(
        json.dumps(
            {
                "benchmark": "recheck",
                "size_bytes": size,
                "size_mib": args.size_mib,
                "piece_length": args.piece_length,
                "repeat": args.repeat,
                "files": spec,
                "payload_reused": reused,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "libtorrent": lt.__version__,
                "platform": platform.platform(),
                "python_startup_seconds": round(startup, 4),
                # The host may be shared: a high load average means noisy figures.
                "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                "results": results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
