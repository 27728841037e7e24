package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/kvm"
	"github.com/vasengine/vasengine/engine"
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

func (f *kvmFlags) backend(stderr io.Writer) (backend, error) {
	m, err := kvm.ParseMode(f.trapMode)
	if err != nil {
		return nil, usagef("-kvm-mode: %v", err)
	}
	paging, err := parseMode(f.sim.mode)
	if err != nil {
		return nil, err
	}
	if err := checkVMs("-vms", f.sim.vms); err != nil {
		return nil, err
	}
	if f.sim.vcpus < 1 || f.sim.vcpus > 16 {
		return nil, usagef("-vcpus %d: must be within 1..16 for kvm", f.sim.vcpus)
	}
	if err := kvm.Available(); err != nil {
		return nil, fmt.Errorf("-backend kvm: %w", err)
	}
	return &kvmBackend{cfg: kvm.Config{VMs: f.sim.vms, VCPUs: f.sim.vcpus, Mode: m, Paging: paging, Seed: f.sim.seed, Iterations: f.iters}}, nil
}

// kvmBackend runs real guests on /dev/kvm.
type kvmBackend struct {
	cfg  kvm.Config
	mu   sync.Mutex
	sum  *kvm.Summary
	done bool
}

func (b *kvmBackend) describe() string {
	return fmt.Sprintf("%d KVM guests (%d vCPUs each, %s mode)", b.cfg.VMs, b.cfg.VCPUs, b.cfg.Mode)
}

func (b *kvmBackend) prepare(context.Context) error { return nil }

func (b *kvmBackend) run(ctx context.Context, host engine.Host, req backends.Request) error {
	sum, err := kvm.Run(ctx, host, b.cfg, req)
	b.mu.Lock()
	b.sum, b.done = &sum, true
	b.mu.Unlock()
	return err
}

func (b *kvmBackend) report(time.Duration) backendReport {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.done {
		return backendReport{Lines: []string{"kvm: the backend had not returned: no guest statistics"}}
	}
	return backendReport{Lines: []string{"kvm: " + b.sum.String()},
		Stats: map[string]any{"guests": len(b.sum.VMs), "traps_per_second": b.sum.TrapsPerSecond(), "total": b.sum.Total}}
}
