package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/kvm"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/vasmon"
)

// kvmFlags: -vms, -vcpus, -mode and -seed are shared with the simulator.
type kvmFlags struct {
	sim      *simFlags
	trapMode string
	iters    uint64
}

func (f *kvmFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.trapMode, "kvm-mode", "trap", "kvm: trap (every write traps, exact) or dirty (dirty-ring harvests, cheap)")
	fs.Uint64Var(&f.iters, "iterations", 0, "kvm: guest iterations per vCPU (0: run for -duration)")
}

// backend checks, before anything runs, that this host's KVM can run what
// the flags ask (kvm.Probe): a paging mode it cannot run, or no usable
// /dev/kvm, is a usage error. -mode mixed runs the modes the host runs,
// guest i in the i-th of them (mod their number), and says which on
// stderr.
func (f *kvmFlags) backend(stderr io.Writer) (backend, error) {
	m, err := kvm.ParseMode(f.trapMode)
	if err != nil {
		return nil, usagef("-kvm-mode: %v", err)
	}
	if err := checkVMs("-vms", f.sim.vms); err != nil {
		return nil, err
	}
	if f.sim.vcpus < 1 || f.sim.vcpus > 16 {
		return nil, usagef("-vcpus %d: must be within 1..16 for kvm", f.sim.vcpus)
	}
	modes, err := f.pagingModes(stderr)
	if err != nil {
		return nil, err
	}
	if m == kvm.Dirty {
		if err := kvm.DirtyRingSupported(); err != nil {
			return nil, usagef("-backend kvm -kvm-mode dirty: %v", err)
		}
	}
	return &kvmBackend{cfg: kvm.Config{VMs: f.sim.vms, VCPUs: f.sim.vcpus, Mode: m, Modes: modes, Seed: f.sim.seed, Iterations: f.iters}}, nil
}

// kvmBackend runs real guests on /dev/kvm.
type kvmBackend struct {
	cfg  kvm.Config
	mu   sync.Mutex
	sum  *kvm.Summary
	done bool
}

func (b *kvmBackend) setSync() error {
	if b.cfg.Mode == kvm.Dirty {
		return usagef("-sync: needs -kvm-mode trap (dirty mode sees writes only after the fact)")
	}
	b.cfg.Sync = true
	return nil
}

func (b *kvmBackend) describe() string {
	var modes []string
	for _, m := range b.cfg.Modes {
		modes = append(modes, m.String())
	}
	vcpus := "vCPUs"
	if b.cfg.VCPUs == 1 {
		vcpus = "vCPU"
	}
	return fmt.Sprintf("%d KVM guests (%s; %d %s each, %s mode)", b.cfg.VMs, strings.Join(modes, ", "), b.cfg.VCPUs, vcpus, b.cfg.Mode)
}

func (b *kvmBackend) prepare(context.Context) error { return nil }

func (b *kvmBackend) run(ctx context.Context, host engine.Host, req backends.Request) error {
	sum, err := kvm.Run(ctx, host, b.cfg, req)
	b.mu.Lock()
	b.sum, b.done = &sum, true
	b.mu.Unlock()
	return err
}

// report: the KVM backend's own figures of the run (kvmSummaryLines).
func (b *kvmBackend) report(time.Duration) backendReport {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.done {
		return backendReport{Lines: []string{"kvm: the backend had not returned: no guest statistics"}}
	}
	s := b.sum
	var modes []string
	for _, m := range s.Paging() {
		modes = append(modes, m.String())
	}
	var r backendReport
	if len(s.VMs) > 0 {
		r.Lines = kvmSummaryLines(*s)
	}
	r.Stats = map[string]any{"guests": len(s.VMs), "kvm_mode": s.Mode.String(), "paging": modes, "elapsed_ns": s.Elapsed,
		"traps_per_second": s.TrapsPerSecond(), "dirty_pages_per_second": s.DirtyPagesPerSecond(), "flip_mean_ns": s.FlipMean(),
		"total": s.Total}
	return r
}

// pagingModes returns the guests' paging modes for -mode, each one this
// host's KVM runs; for -mode mixed it says on stderr which.
func (f *kvmFlags) pagingModes(stderr io.Writer) ([]vasmon.Mode, error) {
	if f.sim.mode != "mixed" && f.sim.mode != "" {
		m, err := parseMode(f.sim.mode)
		if err != nil {
			return nil, err
		}
		if err := kvm.Probe(m); err != nil {
			return nil, usagef("-backend kvm -mode %v: %s", m, oneLine(err.Error()))
		}
		return []vasmon.Mode{m}, nil
	}
	var ok []vasmon.Mode
	var names, no []string
	for _, m := range kvm.GuestModes() {
		err := kvm.Probe(m)
		switch {
		case errors.Is(err, kvm.ErrNoKVM):
			return nil, usagef("-backend kvm: %s", oneLine(err.Error()))
		case err != nil:
			no = append(no, "not "+strings.TrimPrefix(oneLine(err.Error()), kvm.ErrModeUnsupported.Error()+": "))
		default:
			ok = append(ok, m)
			names = append(names, m.String())
		}
	}
	if len(ok) == 0 {
		return nil, usagef("-backend kvm -mode mixed: this host's KVM runs none of the guest's paging modes: %s", strings.Join(no, "; "))
	}
	if stderr != nil {
		if len(no) == 0 {
			fmt.Fprintf(stderr, "kvm: -mode mixed: guest i runs mode i mod %d of %s\n", len(ok), strings.Join(names, ", "))
		} else {
			fmt.Fprintf(stderr, "kvm: -mode mixed runs %s guests only; %s\n", strings.Join(names, ", "), strings.Join(no, "; "))
		}
	}
	return ok, nil
}

// kvmSummaryLines are what the guests did and what trapping or
// harvesting their page-table writes cost, per second of guest run time.
func kvmSummaryLines(s kvm.Summary) []string {
	t := s.Total
	var modes []string
	for _, m := range s.Paging() {
		modes = append(modes, m.String())
	}
	lines := []string{fmt.Sprintf("kvm: %d guests (%s), %s mode, %v of guest run time: %d guest iterations, %d guest self-checks passed; "+
		"%d address spaces started, %d stopped", len(s.VMs), strings.Join(modes, ", "), s.Mode, s.Elapsed.Round(time.Millisecond),
		t.Ops, t.Checks, t.RootsStarted, t.RootsStopped)}
	switch s.Mode {
	case kvm.Dirty:
		lines = append(lines, fmt.Sprintf("kvm: %d dirty pages (%s/s) in %d harvests; %d events submitted, %d rejected; "+
			"nothing write-protected (no slot flips, no shadow zaps)",
			t.DirtyPages, si(s.DirtyPagesPerSecond()), t.Harvests, t.Submitted, t.Rejected))
	default:
		lines = append(lines, fmt.Sprintf("kvm: %d trapped writes (%s/s); %d events submitted, %d rejected; %d shadow zaps; "+
			"%d slot flips (mean %v, max %v)",
			t.Traps, si(s.TrapsPerSecond()), t.Submitted, t.Rejected, t.Zaps,
			t.Flips, s.FlipMean().Round(time.Microsecond), t.FlipMax.Round(time.Microsecond)))
		sync := "asynchronous"
		if t.SyncWrites > 0 {
			sync = fmt.Sprintf("%d synchronous writes (restores included), %d denied and not committed", t.SyncWrites, t.Denied)
		}
		lines = append(lines, fmt.Sprintf("kvm: %s; %d table links still unhooked when their vCPU went back to the guest (windows)",
			sync, t.Windows))
	}
	return lines
}
