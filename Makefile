# vasengine: see README.md. Every target installs what it needs from the
# project's own files; nothing is expected on the machine beyond Go and apt.
GO       ?= go
PKGS     := ./...
# Packages with goroutines of their own or concurrent callers: run under -race.
RACE_PKGS := ./shard/... ./engine/... ./explore/... ./guestmem/... ./backends/... ./trace/... ./cmd/... ./vmlimit/...
FUZZTIME ?= 20s
BENCHTIME ?= 1s

.PHONY: all build run test test-qemu test-race fuzz bench bench-report profile lint clean qemu

all: build

# The revision is stamped by -ldflags too, for builds where Go's own VCS
# stamping is off (GOFLAGS=-buildvcs=false) or impossible.
REVISION := $(shell git rev-parse HEAD 2>/dev/null)$(shell git diff --quiet HEAD 2>/dev/null || echo -dirty)
REVTIME  := $(shell git log -1 --format=%cI 2>/dev/null)
LDFLAGS  := -X main.buildRevision=$(REVISION) -X main.buildTime=$(REVTIME)

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/vasengine ./cmd/vasengine

# The main job on the embedded default: simulated guests, all shards, 10 s.
run: build
	./bin/vasengine run

# go vet, the whole suite (fuzz targets run their seed corpora), then the
# concurrent packages again under the race detector.
test:
	$(GO) vet $(PKGS)
	$(GO) test -count=1 $(PKGS)
	$(GO) test -count=1 -short -race $(RACE_PKGS)
	@# go test hides the output of passing packages: say which real-guest
	@# tests skipped, and why.
	@$(GO) test -count=1 -v -run '^$$' ./backends/qemu/ 2>&1 | grep 'SKIPPED' || echo "make test: the QEMU real-Linux tests were not skipped"
	@$(GO) test -count=1 -v -run '^TestHostModes$$' ./backends/kvm/ 2>&1 | grep '^\*\*\* SKIPPED' | sort -u | grep . || echo "make test: the KVM tests ran every paging mode"

# Only the real-Linux QEMU tests, verbose (they also run in `make test`; ~1 min).
test-qemu:
	VASENGINE_REQUIRE_QEMU=1 $(GO) test -count=1 -v -run 'TestLinux|TestRun' ./backends/qemu/

# A bounded run of every fuzz target.
fuzz:
	@for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg 2>/dev/null | grep '^Fuzz'); do \
	    echo "fuzz $$pkg $$f ($(FUZZTIME))"; \
	    $(GO) test -run XXX -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

bench:
	$(GO) test -run XXX -bench . -benchmem -benchtime $(BENCHTIME) $(PKGS)

# The benchmark report: bench/results/{REPORT.md,bench.txt,*.svg} and the
# README's performance section.
bench-report:
	$(GO) run ./bench/report -benchtime $(BENCHTIME)

# The QEMU backend's kernel, initramfs and TCG plugin, in its cache folder
# ($$XDG_CACHE_HOME/vasengine/qemu, or $$VASENGINE_QEMU_DIR; the QEMU tests run
# this themselves when the artifacts are missing).
qemu:
	sh scripts/qemu-setup.sh

profile: build
	mkdir -p build/profile
	./bin/vasengine run -duration 5s -cpuprofile build/profile/cpu.pprof -memprofile build/profile/mem.pprof \
	  -mutexprofile build/profile/mutex.pprof -blockprofile build/profile/block.pprof
	$(GO) tool pprof -top -nodecount 25 bin/vasengine build/profile/cpu.pprof

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	@if $(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 -version >/dev/null 2>&1; then \
	  $(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 $(PKGS); \
	else echo "staticcheck unavailable from the module proxy: skipped"; fi

clean:
	rm -rf bin build
