#!/usr/bin/env bash
# Two capsulefs builds on the fsync path, A/B: each mounts a fresh capsule holding the 5000
# small files of bench-fs's untar, then rounds of fsync'ed appends alternate between the two
# mounts. Prints each round (microseconds per append, the daemon's CPU per append) and the
# means. On a shared VM single runs move by a third; alternating puts the drift on both.
#   benches/fsync-ab.sh A_BIN B_BIN [ROUNDS (default 8)] [APPENDS per round (default 1000)]
# Needs root (mounts) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,7p' "$0" >&2; exit 2; }
A=$(realpath "$1") B=$(realpath "$2") ROUNDS=${3:-8} APPENDS=${4:-1000}
W=$(realpath -m "${BENCH_DIR:-target/fsync-ab}")

bin() { if [ "$1" = a ]; then echo "$A"; else echo "$B"; fi; }
cleanup() {
  for v in a b; do
    if mountpoint -q "$W/$v/mnt"; then CAPSULEFS_HOME="$W/$v/home" "$(bin $v)" umount "$W/$v/mnt" || true; fi
  done
  rm -rf "$W"
}
trap cleanup EXIT
cleanup
mkdir -p "$W/src/small"
for d in $(seq 1 50); do
  mkdir -p "$W/src/small/d$d"
  for f in $(seq 1 100); do head -c $(( (d * 131 + f * 977) % 3072 + 1024 )) /dev/urandom > "$W/src/small/d$d/f$f"; done
done
for v in a b; do
  mkdir -p "$W/$v/mnt"
  CAPSULEFS_HOME="$W/$v/home" "$(bin $v)" create bench >/dev/null 2>&1
  CAPSULEFS_HOME="$W/$v/home" "$(bin $v)" mount bench "$W/$v/mnt"
  cp -r "$W/src/small" "$W/$v/mnt/"
done
sync

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for r in $(seq "$ROUNDS"); do
  for v in a b; do
    pid=$(pgrep -f "mount --foreground bench $W/$v/mnt" | head -1)
    sync
    c0=$(cpu_ticks "$pid")
    us=$(python3 -c '
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
n = int(sys.argv[2]); t = time.monotonic()
for i in range(n):
    os.write(fd, b"%08d appended line of a log, made durable before the next\n" % i)
    os.fsync(fd)
print(round((time.monotonic() - t) / n * 1e6))' "$W/$v/mnt/journal-$r" "$APPENDS")
    c1=$(cpu_ticks "$pid")
    echo "$v round $r: $us us per append, daemon CPU $(( (c1 - c0) * 1000000 / $(getconf CLK_TCK) / APPENDS )) us"
  done
done | tee "$W.log"
awk '{n[$1]++; us[$1] += $4; cpu[$1] += $10} END {for (v in n) printf "%s mean: %.0f us per append, daemon CPU %.0f us\n", v, us[v] / n[v], cpu[v] / n[v]}' "$W.log" | sort
rm -f "$W.log"
