package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
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
	out      io.Writer    // notes (stderr)
	cfg      kvm.Config   // what backend chose
	sum      *kvm.Summary // the run's, once it has ended
}

func (f *kvmFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.trapMode, "kvm-mode", "trap", "kvm: trap (every write traps, exact) or dirty (dirty-ring harvests, cheap)")
	fs.Uint64Var(&f.iters, "iterations", 0, "kvm: guest iterations per vCPU (0: run for -duration)")
}

// backend checks, before anything runs, that this host's KVM can run what
// the flags ask (kvm.Probe): a paging mode it cannot run, or no usable
// /dev/kvm, is a usage error. -mode mixed runs the modes the host runs,
// guest i in the i-th of them (mod their number), and says which.
func (f *kvmFlags) backend() (backendRun, error) {
	m, err := kvm.ParseMode(f.trapMode)
	if err != nil {
		return nil, usagef("-kvm-mode: %v", err)
	}
	if f.sim.vms < 1 || f.sim.vcpus < 1 || f.sim.vcpus > 16 {
		return nil, usagef("-vms must be at least 1 and -vcpus between 1 and 16 for kvm")
	}
	modes, err := f.pagingModes()
	if err != nil {
		return nil, err
	}
	if m == kvm.Dirty {
		if err := kvm.DirtyRingSupported(); err != nil {
			return nil, usagef("-backend kvm -kvm-mode dirty: %v", err)
		}
	}
	f.cfg = kvm.Config{VMs: f.sim.vms, VCPUs: f.sim.vcpus, Mode: m, Modes: modes, Seed: f.sim.seed, Iterations: f.iters}
	f.sum = nil
	return func(ctx context.Context, host engine.Host, req backends.Request) error {
		sum, err := kvm.Run(ctx, host, f.cfg, req)
		f.sum = &sum
		return err
	}, nil
}

// pagingModes returns the guests' paging modes for -mode, each one this
// host's KVM runs.
func (f *kvmFlags) pagingModes() ([]vasmon.Mode, error) {
	if f.sim.mode != "mixed" && f.sim.mode != "" {
		m, err := parseMode(f.sim.mode)
		if err != nil {
			return nil, err
		}
		if err := kvm.Probe(m); err != nil {
			return nil, usagef("-backend kvm -mode %v: %s", m, oneLine(err))
		}
		return []vasmon.Mode{m}, nil
	}
	var ok []vasmon.Mode
	var names, no []string
	for _, m := range kvm.GuestModes() {
		err := kvm.Probe(m)
		switch {
		case errors.Is(err, kvm.ErrNoKVM):
			return nil, usagef("-backend kvm: %s", oneLine(err))
		case err != nil:
			no = append(no, "not "+strings.TrimPrefix(oneLine(err), kvm.ErrModeUnsupported.Error()+": "))
		default:
			ok = append(ok, m)
			names = append(names, m.String())
		}
	}
	if len(ok) == 0 {
		return nil, usagef("-backend kvm -mode mixed: this host's KVM runs none of the guest's paging modes: %s", strings.Join(no, "; "))
	}
	if f.out != nil {
		if len(no) == 0 {
			fmt.Fprintf(f.out, "kvm: -mode mixed: guest i runs mode i mod %d of %s\n", len(ok), strings.Join(names, ", "))
		} else {
			fmt.Fprintf(f.out, "kvm: -mode mixed runs %s guests only; %s\n", strings.Join(names, ", "), strings.Join(no, "; "))
		}
	}
	return ok, nil
}

// printSummary prints the KVM backend's own figures of the run, if one
// ran.
func (f *kvmFlags) printSummary(w io.Writer) {
	if f.sum != nil && len(f.sum.VMs) > 0 {
		printKVMSummary(w, *f.sum)
	}
}

// printKVMSummary prints what the guests did and what trapping or
// harvesting their page-table writes cost, per second of guest run time.
func printKVMSummary(w io.Writer, s kvm.Summary) {
	t := s.Total
	var modes []string
	for _, m := range s.Paging() {
		modes = append(modes, m.String())
	}
	fmt.Fprintf(w, "\nkvm: %d guests (%s), %s mode, %v of guest run time: %d guest iterations, %d guest self-checks passed; "+
		"%d address spaces started, %d stopped\n", len(s.VMs), strings.Join(modes, ", "), s.Mode, s.Elapsed.Round(time.Millisecond),
		t.Ops, t.Checks, t.RootsStarted, t.RootsStopped)
	switch s.Mode {
	case kvm.Dirty:
		fmt.Fprintf(w, "kvm: %d dirty pages (%s/s) in %d harvests; %d events submitted, %d rejected; "+
			"nothing write-protected (no slot flips, no shadow zaps)\n",
			t.DirtyPages, si(s.DirtyPagesPerSecond()), t.Harvests, t.Submitted, t.Rejected)
	default:
		fmt.Fprintf(w, "kvm: %d trapped writes (%s/s); %d events submitted, %d rejected; %d shadow zaps; "+
			"%d slot flips (mean %v, max %v)\n",
			t.Traps, si(s.TrapsPerSecond()), t.Submitted, t.Rejected, t.Zaps,
			t.Flips, s.FlipMean().Round(time.Microsecond), t.FlipMax.Round(time.Microsecond))
	}
}

// oneLine joins the lines of an error (errors.Join makes several).
func oneLine(err error) string { return strings.ReplaceAll(err.Error(), "\n", "; ") }
