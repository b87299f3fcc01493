#!/usr/bin/env bash
# Every benchmark of BENCHMARKS.md, one after the other, in one run on this machine.
# Each prints JSON; it is kept in bench/out/all/NAME.json (progress in NAME.err), with
# machine.json saying what ran where. Run it on a quiet machine: about 15 minutes.
#
#   bash bench/all.sh            # or: make bench-all
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=bench/out/all
mkdir -p "$OUT"

run() {  # NAME COMMAND...: the command's JSON to NAME.json, its progress to NAME.err
  local name=$1
  shift
  echo "== $name: $*" >&2
  local t0=$SECONDS
  "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"
  echo "   $((SECONDS - t0)) s" >&2
}

$PY - >"$OUT/machine.json" <<'EOF'
import json, os, platform, subprocess, time
import libtorrent
print(json.dumps({
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip(),
    "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
    "libtorrent": libtorrent.__version__, "loadavg": os.getloadavg(),
}, indent=2))
EOF

# First: every free page used once (on a VM whose host gives memory on first touch, a
# page's first use costs the host a fault: see bench/prefault.py).
run prefault $PY bench/prefault.py
run recheck_warm $PY bench/recheck.py --size-mib 2048 --piece-kib 4096 --kinds v1,hybrid --repeat 3
run recheck_cold $PY bench/recheck.py --size-mib 2048 --piece-kib 4096 --kinds v1,hybrid --repeat 3 --cold
run write_path $PY bench/write_path.py --size-mib 1024 --repeat 3 --no-check
run ingest $PY bench/ingest.py --size-mib 1024 --repeat 3 --no-check
run ingest_disabled $PY bench/ingest.py --size-mib 1024 --repeat 3 --no-check --backend disabled
run sync_window $PY bench/sync_window.py --no-check
run cache $PY bench/cache_arc_vs_lru.py
run http_load $PY bench/http_load.py --torrents 1000 --payload-mib 128 --seconds 8 --rounds 2
run crash $PY bench/crash.py --rounds 100
run peer_transfer $PY bench/peer_transfer.py --size-mib 1024 --kinds v1,hybrid --repeat 3
run peer_transmission $PY bench/peer_transmission.py --size-mib 256 --repeat 2
run async_reads $PY bench/async_reads.py --size-mib 128 --repeat 5 --inflight 1,64,512
run seeding_reads $PY bench/async_reads.py --size-mib 1024 --piece-kib 4096 --read-kib 1024 --inflight 8 --via data,into,ring
run async_writes $PY bench/async_reads.py --size-mib 256 --repeat 3 --inflight 64,256 --via write_chunk,write_ring
run huge_files $PY bench/huge_torrents.py --files 100000
run huge_pieces $PY bench/huge_torrents.py --files 1 --file-bytes 17179869184 --piece-kib 16
run backends $PY bench/backends.py --size-mib 1024 --backends posix,direct,uring
run hostile_clients $PY bench/hostile_clients.py
$PY -c 'import json, os; print(json.dumps({"loadavg_at_end": os.getloadavg()}))' >"$OUT/end.json"
