package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/kvm"
	"github.com/vasengine/vasengine/engine"
)

// kvmFlags: -vms, -vcpus, -mode and -seed are shared with the simulator.
type kvmFlags struct {
	sim      *simFlags
	trapMode string
	iters    uint64
	out      io.Writer
}

func (f *kvmFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.trapMode, "kvm-mode", "trap", "kvm: trap (every write traps, exact) or dirty (dirty-ring harvests, cheap)")
	fs.Uint64Var(&f.iters, "iterations", 0, "kvm: guest iterations per vCPU (0: run for -duration)")
}

func (f *kvmFlags) backend() (backendRun, error) {
	m, err := kvm.ParseMode(f.trapMode)
	if err != nil {
		return nil, usagef("-kvm-mode: %v", err)
	}
	paging, err := parseMode(f.sim.mode)
	if err != nil {
		return nil, err
	}
	if f.sim.vms < 1 || f.sim.vcpus < 1 || f.sim.vcpus > 16 {
		return nil, usagef("-vms must be at least 1 and -vcpus between 1 and 16 for kvm")
	}
	if err := kvm.Available(); err != nil {
		return nil, fmt.Errorf("-backend kvm: %w", err)
	}
	cfg := kvm.Config{VMs: f.sim.vms, VCPUs: f.sim.vcpus, Mode: m, Paging: paging, Seed: f.sim.seed, Iterations: f.iters}
	out := f.out
	return func(ctx context.Context, host engine.Host, req backends.Request) error {
		sum, err := kvm.Run(ctx, host, cfg, req)
		if out != nil {
			fmt.Fprintf(out, "kvm: %d guests, %.0f trapped writes/s of guest run time (CPL0)\n", len(sum.VMs), sum.TrapsPerSecond())
		}
		return err
	}, nil
}
