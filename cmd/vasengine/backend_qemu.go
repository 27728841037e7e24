package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/qemu"
	"github.com/vasengine/vasengine/engine"
)

// qemuFlags: real Linux guests under QEMU TCG (scripts/qemu-setup.sh and
// `make qemu` prepare the kernel, initramfs and plugin).
type qemuFlags struct {
	guests, jobs, mem, vcpus int
	workload                 string
	sum                      *qemu.Summary // the run's, once it has ended
}

func (f *qemuFlags) register(fs *flag.FlagSet) {
	fs.IntVar(&f.guests, "guests", 1, "qemu: Linux guests run at once")
	fs.StringVar(&f.workload, "workload", "mixed", "qemu: guest workload (fork, mmap, grow, idle, mixed)")
	fs.IntVar(&f.jobs, "jobs", 1, "qemu: concurrent copies of the workload per guest")
	fs.IntVar(&f.mem, "guest-mem", 512, "qemu: guest RAM in MiB (at most 2048)")
	fs.IntVar(&f.vcpus, "guest-vcpus", 1, "qemu: vCPUs per guest")
}

func (f *qemuFlags) backend() (backendRun, error) {
	if f.guests < 1 || f.jobs < 1 || f.vcpus < 1 || f.mem < 64 || f.mem > 2048 {
		return nil, usagef("qemu: -guests, -jobs and -guest-vcpus must be at least 1 and -guest-mem within 64..2048")
	}
	cfg := qemu.Config{Guests: f.guests, Workload: f.workload, Jobs: f.jobs, MemMB: f.mem, VCPUs: f.vcpus}
	return func(ctx context.Context, host engine.Host, req backends.Request) error {
		sum, err := qemu.Run(ctx, host, cfg, req)
		f.sum = &sum
		return err
	}, nil
}

// printSummary prints each guest's phantom callbacks (qemu.CheckEntry;
// SEMANTICS.md section 6), which must be 0, if a QEMU run ended.
func (f *qemuFlags) printSummary(w io.Writer) {
	if f.sum == nil {
		return
	}
	for _, g := range f.sum.Guests {
		fmt.Fprintf(w, "qemu: VM %d: %d phantom callbacks (must be 0) of %d reporting a present entry\n", g.VM, g.Phantoms, g.Present)
	}
}
