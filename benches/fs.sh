#!/usr/bin/env bash
# make bench-fs: the same workloads on tmpfs, bindfs, gocryptfs and capsulefs, in one run,
# backing stores on the same disk. Seconds per cell, then one line comparing capsulefs with
# gocryptfs on its worst workload. Needs root (tmpfs mount, dropping caches) and the Debian
# packages bindfs and gocryptfs (make deps-bench).
#   BENCH_MB     size of the sequential file (default 512)
#   BENCH_ROUNDS rounds of every workload on every system, interleaved; each cell is the
#                median (default 3: on a shared VM single runs move by a third)
#   BENCH_VERBOSE=1 also prints every run of every cell (to stderr)
#   BENCH_WORKLOADS a subset of the workloads, space-separated (default: all of them)
#   BENCH_DIR  work folder (default target/bench-fs, on the same disk as the build)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/capsulefs}
MB=${BENCH_MB:-512}
ROUNDS=${BENCH_ROUNDS:-3}
W=$(realpath -m "${BENCH_DIR:-target/bench-fs}")
FILES=5000
# ext4 is a plain folder on the disk the other backing stores use: the floor for the fsync rows.
SYSTEMS=(tmpfs ext4 bindfs gocryptfs capsulefs)
read -r -a WORKLOADS <<< "${BENCH_WORKLOADS:-seq_write seq_read untar ls_lR read_all rm_rf fsync_append sqlite}"
APPENDS=2000
TRANSACTIONS=500

for tool in bindfs gocryptfs; do
  command -v "$tool" >/dev/null || { echo "bench-fs: $tool is missing: run make deps-bench" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench-fs: run as root (tmpfs mount, drop_caches)" >&2; exit 1; }

cleanup() {
  for s in "${SYSTEMS[@]}"; do
    if mountpoint -q "$W/$s"; then
      if [ "$s" = capsulefs ]; then CAPSULEFS_HOME="$W/capsulefs-home" "$BIN" umount "$W/$s" || true
      else umount "$W/$s" || fusermount3 -u "$W/$s" || true; fi
    fi
  done
  rm -rf "$W"
}
trap cleanup EXIT
cleanup
mkdir -p "$W"

# 5000 small files (1-4 KiB) in 50 folders, as one tar made once.
mkdir -p "$W/src/small"
for d in $(seq 1 50); do
  mkdir -p "$W/src/small/d$d"
  for f in $(seq 1 $((FILES / 50))); do
    head -c $(( (d * 131 + f * 977) % 3072 + 1024 )) /dev/urandom > "$W/src/small/d$d/f$f"
  done
done
tar -cf "$W/small.tar" -C "$W/src" small
rm -rf "$W/src"

mount_system() {
  local s=$1 m="$W/$1"
  mkdir -p "$m"
  case $s in
    tmpfs) mount -t tmpfs -o size=$((MB * 2 + 512))m tmpfs "$m" ;;
    ext4) ;;
    bindfs) mkdir -p "$W/bindfs-back"; bindfs "$W/bindfs-back" "$m" ;;
    gocryptfs)
      mkdir -p "$W/gocryptfs-back"
      gocryptfs -q -nosyslog -init -extpass "echo benchmark-password" "$W/gocryptfs-back" >/dev/null
      gocryptfs -q -nosyslog -extpass "echo benchmark-password" "$W/gocryptfs-back" "$m" ;;
    capsulefs)
      CAPSULEFS_HOME="$W/capsulefs-home" "$BIN" create bench >/dev/null 2>&1
      CAPSULEFS_HOME="$W/capsulefs-home" "$BIN" mount bench "$m" ;;
  esac
}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

run_workload() {
  local m=$1 w=$2
  case $w in
    seq_write) dd if=/dev/zero of="$m/big" bs=1M count="$MB" conv=fsync status=none ;;
    seq_read) dd if="$m/big" of=/dev/null bs=1M status=none ;;
    untar) tar -xf "$W/small.tar" -C "$m" && sync ;;
    ls_lR) ls -lR "$m" > /dev/null ;;
    read_all) find "$m/small" -type f -exec cat {} + > /dev/null ;;
    rm_rf) rm -rf "$m/small" "$m/big" && sync ;;
    # An editor's or mail client's pattern: small appends, each made durable.
    fsync_append) rm -f "$m/journal" && python3 -c '
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
for i in range(int(sys.argv[2])):
    os.write(fd, b"%08d appended line of a log, made durable before the next\n" % i)
    os.fsync(fd)
os.close(fd)' "$m/journal" "$APPENDS" ;;
    # A database's pattern: one row per transaction, in rollback-journal mode (the default).
    sqlite) rm -f "$m/bench.db" && { echo "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT);"
        for i in $(seq "$TRANSACTIONS"); do echo "BEGIN; INSERT INTO t (v) VALUES ('row $i of the benchmark'); COMMIT;"; done
      } | sqlite3 "$m/bench.db" ;;
  esac
}

median() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

declare -A RUNS T
for s in "${SYSTEMS[@]}"; do mount_system "$s"; done
for r in $(seq "$ROUNDS"); do
  for s in "${SYSTEMS[@]}"; do
    for w in "${WORKLOADS[@]}"; do
      # Every workload starts on a settled disk, so none pays for the writeback of what ran
      # before it (another system's files on the same disk); reads start from an empty cache.
      case $w in seq_read|ls_lR|read_all) drop_caches ;; *) sync ;; esac
      start=$(date +%s.%N)
      run_workload "$W/$s" "$w"
      RUNS[$s,$w]+=" $(echo "$(date +%s.%N) - $start" | bc -l)"
    done
  done
done
for key in "${!RUNS[@]}"; do T[$key]=$(echo "${RUNS[$key]}" | median); [ -n "${BENCH_VERBOSE:-}" ] && echo "$key:${RUNS[$key]}" >&2; done

printf '%-10s' workload; printf '%12s' "${SYSTEMS[@]}"; printf '%14s\n' capsule/gocfs
worst=""; max=0
for w in "${WORKLOADS[@]}"; do
  printf '%-10s' "$w"
  for s in "${SYSTEMS[@]}"; do printf '%12.3f' "${T[$s,$w]}"; done
  r=$(echo "${T[capsulefs,$w]} / ${T[gocryptfs,$w]}" | bc -l)
  printf '%14.2f\n' "$r"
  if [ "$(echo "$r > $max" | bc -l)" = 1 ]; then max=$r; worst=$w; fi
done
echo "(seconds, median of $ROUNDS rounds; seq_write/seq_read move $MB MiB, untar/read_all/rm_rf $FILES files,"
echo " fsync_append $APPENDS appends each followed by fsync, sqlite $TRANSACTIONS one-row transactions)"
printf 'fsbench: vs_gocryptfs max_ratio=%.2f worst=%s\n' "$max" "$worst"
