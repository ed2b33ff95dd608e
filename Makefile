# capsulefs — build, test, benchmark and install. `make help` lists the targets.

PREFIX   ?= /usr/local
# mount(8) looks for its helpers (mount.fuse.capsulefs) in /sbin only.
SBINDIR  ?= /sbin
# systemd reads units from here too (and from /etc/systemd/system, the admin's own).
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
CARGO    ?= cargo
BIN      := target/release/capsulefs
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_HOME ?= $(CURDIR)/.demo
# Debian packages: RocksDB 7.8 to link against (see .cargo/config.toml), libclang for its
# bindgen, FUSE for mounts; attr (getfattr/setfattr), rsync, git and sqlite3 for the tests that
# run everyday tools inside a mount; curl for the tests that read a server's /metrics; openssl
# for their TLS certificates; python3-venv for the S3 server the bucket tests start (moto).
APT_PACKAGES := librocksdb-dev libclang-dev clang pkg-config fuse3 libfuse3-dev attr rsync git sqlite3 curl openssl \
	python3 python3-venv

.PHONY: help deps deps-bench build-bench bench-fs bench-sync bench-quorum bench-s3 bench-soak tools garage build test lint bench chaos man completions install demo clean

# Test tools from crates.io, pinned, kept out of the way in target/tools.
TOOLS := $(CURDIR)/target/tools
GARAGE_ROOT ?= /var/cache/capsulefs/garage

help:
	@echo "make deps         install the Debian packages the build and tests need (root or sudo)"
	@echo "make demo         build, create a local capsule (state in .demo/) and mount it at ./capsule"
	@echo "make build        release build"
	@echo "make tools        install the test tools: fsx and moto's S3 server into target/tools, and"
	@echo "                  Garage into GARAGE_ROOT=$(GARAGE_ROOT) (built once, about 19 minutes)"
	@echo "make test         format check, clippy, unit, library and integration tests (real mounts)"
	@echo "make chaos        a seeded fault-injection run of three syncing mounts (root; SEED=S DURATION=SECS)"
	@echo "make bench        capsulefs bench proofs (the DataCapsule poster's figure 4)"
	@echo "make bench-fs     capsulefs against tmpfs, bindfs and gocryptfs (root; make deps-bench first)"
	@echo "make bench-sync   anti-entropy against capsulefs serve, push against rsync, and mount to mount"
	@echo "                  against Syncthing (root: it mounts; make deps-bench installs Syncthing)"
	@echo "make bench-quorum pull through a quorum of 4 servers against one, and fork detection rates"
	@echo "make bench-s3     push and clone through a 3-node Garage cluster against the AWS CLI (root)"
	@echo "make bench-soak   an honest client's push and pull against a server under every flood at once"
	@echo "make man          regenerate man/ from the CLI definition"
	@echo "make install      binary, man pages and shell completions under PREFIX=$(PREFIX), and"
	@echo "                  the mount(8) helper $(SBINDIR)/mount.fuse.capsulefs, and the server's"
	@echo "                  systemd unit capsulefs-serve@.service in SYSTEMDUNITDIR=$(SYSTEMDUNITDIR)"

deps:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(APT_PACKAGES)

deps-bench:
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends bindfs gocryptfs bc syncthing

tools: $(TOOLS)/bin/fsx $(TOOLS)/moto/bin/moto_server $(GARAGE_ROOT)/bin/garage

$(TOOLS)/bin/fsx:
	$(CARGO) install fsx@0.3.2 --locked --root $(TOOLS)

# Garage, a real distributed S3 store, for the bucket tests' three-node cluster. Built once
# outside the clone (about 19 minutes on 2 cores), so a machine that built it reuses it.
garage: $(GARAGE_ROOT)/bin/garage

$(GARAGE_ROOT)/bin/garage:
	$(CARGO) install garage --version 2.5.0 --locked --no-default-features --features bundled-libs,sqlite \
		--root $(GARAGE_ROOT)

# An S3-compatible server for the bucket tests, in a venv of its own.
$(TOOLS)/moto/bin/moto_server:
	python3 -m venv $(TOOLS)/moto
	$(TOOLS)/moto/bin/pip install -q 'moto[server]==5.2.5'


build:
	$(CARGO) build --release --locked

# The same binary with `capsulefs bench ...`, which the shipped one leaves out.
build-bench:
	$(CARGO) build --release --locked --features bench

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	$(CARGO) clippy --locked --all-targets --features bench -- -D warnings

test: lint tools
	GARAGE=$(GARAGE_ROOT)/bin/garage $(CARGO) test --locked

bench: build-bench
	$(BIN) bench proofs

# Three mounts syncing through a server, random operations and faults from one seed; the last
# line is the verdict. `make test` runs it for 30 s with a fixed seed and a random one.
SEED ?=
DURATION ?= 600
chaos:
	CHAOS_SEED=$(SEED) CHAOS_DURATION=$(DURATION) $(CARGO) test --locked --test integration chaos -- --nocapture

# tmpfs, bindfs, gocryptfs and capsulefs on the same workloads (root; BENCH_MB=512 by default).
bench-fs: build
	$(SUDO) BIN=$(BIN) benches/fs.sh

# Two replicas of 100k records on loopback, a 512 MiB push against an rsync daemon, and two
# mounts syncing through one server against Syncthing (root: it mounts).
bench-sync: build-bench
	$(BIN) bench sync

# Pull through a quorum of 4 servers against one, and fork detection by simulation.
bench-quorum: build-bench
	$(BIN) bench quorum

# capsulefs against the AWS CLI on a three-node Garage cluster (root: it mounts).
bench-s3: $(TOOLS)/aws/bin/aws $(GARAGE_ROOT)/bin/garage
	GARAGE=$(GARAGE_ROOT)/bin/garage AWS_CLI=$(TOOLS)/aws/bin/aws $(CARGO) bench --locked --bench s3

# Push and pull latency under hostile load against the same on an idle server (SOAK_SECS,
# SOAK_ROUNDS).
bench-soak:
	$(CARGO) bench --locked --bench soak

# The AWS CLI, the plain uploader bench-s3 compares with, in a venv of its own.
$(TOOLS)/aws/bin/aws:
	python3 -m venv $(TOOLS)/aws
	$(TOOLS)/aws/bin/pip install -q 'awscli==1.46.3'

man: build
	rm -f man/*.1
	$(BIN) generate-man man

completions: build
	mkdir -p target/completions
	$(BIN) completions bash > target/completions/capsulefs
	$(BIN) completions zsh > target/completions/_capsulefs
	$(BIN) completions fish > target/completions/capsulefs.fish

install: build completions
	install -Dm755 $(BIN) $(DESTDIR)$(PREFIX)/bin/capsulefs
	install -d $(DESTDIR)$(SBINDIR)
	ln -sf $(PREFIX)/bin/capsulefs $(DESTDIR)$(SBINDIR)/mount.fuse.capsulefs
	install -d $(DESTDIR)$(PREFIX)/share/man/man1
	install -m644 man/*.1 $(DESTDIR)$(PREFIX)/share/man/man1/
	install -Dm644 target/completions/capsulefs $(DESTDIR)$(PREFIX)/share/bash-completion/completions/capsulefs
	install -Dm644 target/completions/_capsulefs $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_capsulefs
	install -Dm644 target/completions/capsulefs.fish $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/capsulefs.fish
	install -d $(DESTDIR)$(SYSTEMDUNITDIR)
	sed 's|@BINDIR@|$(PREFIX)/bin|' contrib/capsulefs-serve@.service > $(DESTDIR)$(SYSTEMDUNITDIR)/capsulefs-serve@.service
	install -Dm644 contrib/serve-example.toml $(DESTDIR)$(PREFIX)/share/doc/capsulefs/serve-example.toml

# The main job on an embedded default: a local capsule, mounted at ./capsule and left mounted.
demo: build
	-@$(BIN) --home $(DEMO_HOME) umount capsule 2>/dev/null
	rm -rf $(DEMO_HOME)
	mkdir -p capsule
	@echo "== create a capsule (its first record is the keystore) and mount it at ./capsule"
	$(BIN) --home $(DEMO_HOME) create demo
	$(BIN) --home $(DEMO_HOME) mount demo capsule
	@echo "== copy files in with ordinary tools"
	cp -a README.md src capsule/
	ls -l capsule
	@echo "== unmount, verify every record and sub-record, mount again: all still there"
	$(BIN) --home $(DEMO_HOME) umount capsule
	$(BIN) --home $(DEMO_HOME) verify demo
	$(BIN) --home $(DEMO_HOME) log demo | head -n 3
	$(BIN) --home $(DEMO_HOME) mount demo capsule
	diff -r src capsule/src && echo "capsule/src matches src"
	@echo "== every commit is a read-only folder in capsule/.capsule/history; live figures:"
	ls capsule/.capsule/history | head -n 3
	$(BIN) --home $(DEMO_HOME) status capsule
	@echo "== ./capsule is mounted; work in it, then: $(BIN) --home $(DEMO_HOME) umount capsule"

clean:
	-@$(BIN) --home $(DEMO_HOME) umount capsule 2>/dev/null
	$(CARGO) clean
	rm -rf $(DEMO_HOME) capsule
