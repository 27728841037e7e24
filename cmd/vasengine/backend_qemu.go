package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/qemu"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/vasmon"
)

// qemuFlags: real Linux guests under QEMU TCG. Their kernel, initramfs and
// plugin come from -qemu-dir (default: the cache folder
// $XDG_CACHE_HOME/vasengine/qemu, which scripts/qemu-setup.sh and `make
// qemu` fill), whatever the working directory.
type qemuFlags struct {
	guests, jobs, mem, vcpus int
	workload                 string
	dir                      string
}

func (f *qemuFlags) register(fs *flag.FlagSet) {
	def, err := qemu.DefaultDir()
	if err != nil {
		def = ""
	}
	fs.IntVar(&f.guests, "guests", 1, fmt.Sprintf("qemu: Linux guests run at once (1..%d, within the host's memory)", maxVMs))
	fs.StringVar(&f.workload, "workload", "mixed", "qemu: guest workload ("+strings.Join(qemu.Workloads, ", ")+")")
	fs.IntVar(&f.jobs, "jobs", 1, "qemu: concurrent copies of the workload per guest")
	fs.IntVar(&f.mem, "guest-mem", 512, "qemu: guest RAM in MiB (64..2048)")
	fs.IntVar(&f.vcpus, "guest-vcpus", 1, "qemu: vCPUs per guest")
	fs.StringVar(&f.dir, "qemu-dir", def, "qemu: folder of vmlinuz, initrd.gz and ptstore.so (filled by scripts/qemu-setup.sh; default $VASENGINE_QEMU_DIR, else $XDG_CACHE_HOME/vasengine/qemu)")
}

func (f *qemuFlags) backend() (backend, error) {
	if err := checkVMs("-guests", f.guests); err != nil {
		return nil, err
	}
	if f.jobs < 1 || f.vcpus < 1 || f.mem < 64 || f.mem > 2048 {
		return nil, usagef("qemu: -jobs and -guest-vcpus must be at least 1 and -guest-mem within 64..2048")
	}
	known := false
	for _, w := range qemu.Workloads {
		known = known || w == f.workload
	}
	if !known {
		return nil, usagef("-workload %q: want one of %s", f.workload, strings.Join(qemu.Workloads, ", "))
	}
	if err := checkMemory(fmt.Sprintf("-guests %d x -guest-mem %d MiB", f.guests, f.mem), int64(f.guests)*int64(f.mem)<<20); err != nil {
		return nil, err
	}
	if f.dir == "" {
		return nil, usagef("-backend qemu: no cache folder for the guest kernel: give -qemu-dir")
	}
	if st, err := os.Stat(f.dir); err != nil || !st.IsDir() {
		return nil, usagef("-qemu-dir %s: no such folder: run scripts/qemu-setup.sh (or `make qemu`) to fill it, or point -qemu-dir at a folder holding vmlinuz, initrd.gz and ptstore.so", f.dir)
	}
	if _, _, _, err := qemu.Artifacts(f.dir); err != nil {
		return nil, usagef("-qemu-dir %s: %s: run scripts/qemu-setup.sh %s (or `make qemu`)", f.dir, oneLine(err.Error()), f.dir)
	}
	return &qemuBackend{cfg: qemu.Config{Guests: f.guests, Workload: f.workload, Jobs: f.jobs, MemMB: f.mem, VCPUs: f.vcpus, Dir: f.dir, Sync: false}}, nil
}

// qemuBackend runs real Linux guests under QEMU.
type qemuBackend struct {
	cfg  qemu.Config
	mu   sync.Mutex
	sum  qemu.Summary
	done bool
}

func (b *qemuBackend) describe() string {
	return fmt.Sprintf("%d Linux guests under QEMU (%s workload, %d MiB, kernel from %s)", b.cfg.Guests, b.cfg.Workload, b.cfg.MemMB, b.cfg.Dir)
}

func (b *qemuBackend) prepare(context.Context) error { return nil }

// setSync: -sync holds each storing vCPU in the plugin until the engine is
// done with the write (qemu.Config.Sync).
func (b *qemuBackend) setSync() error {
	b.cfg.Sync = true
	return nil
}

func (b *qemuBackend) run(ctx context.Context, host engine.Host, req backends.Request) error {
	cfg := b.cfg
	if cfg.Sync {
		// The guests' synchronous submissions go to the engine under the
		// session's host.
		if ah, ok := host.(*abortHost); ok && ah.e != nil {
			cfg.NewSyncer = func(vm vasmon.VMID) (qemu.Syncer, error) {
				s, err := ah.e.NewSyncer(vm)
				if err != nil {
					return nil, err
				}
				return s, nil
			}
		}
	}
	sum, err := qemu.Run(ctx, host, cfg, req)
	b.mu.Lock()
	b.sum, b.done = sum, true
	b.mu.Unlock()
	return err
}

func (b *qemuBackend) report(time.Duration) backendReport {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.done {
		return backendReport{Lines: []string{"qemu: the backend had not returned: no guest statistics"}}
	}
	var r backendReport
	var guests []map[string]any
	for _, g := range b.sum.Guests {
		r.Lines = append(r.Lines, fmt.Sprintf("qemu: VM %d: %d events submitted, %d rejected; %d page-table stores; plugin drops %d; boot %v, workload %v; %d phantom callbacks (must be 0) of %d reporting a present entry",
			g.VM, g.Submitted, g.Rejected, g.TableStores, g.Plugin.Drops, g.Boot.Round(time.Millisecond), g.Workload.Round(time.Millisecond), g.Phantoms, g.Present))
		if b.cfg.Sync {
			r.Lines = append(r.Lines, fmt.Sprintf("qemu: VM %d: synchronous: %d writes held their vCPU %v on average; %d denied, %d reverted, %d not; %d holds given up",
				g.VM, g.Synced, time.Duration(g.Plugin.HeldNs/max(g.Synced, 1)), g.Denied, g.Reverted, g.Unreverted, g.Plugin.GiveUps))
			if g.Plugin.GiveUps != 0 {
				r.Warnings = append(r.Warnings, fmt.Sprintf("qemu: VM %d: %d holds given up (no answer within 10 s)", g.VM, g.Plugin.GiveUps))
			}
		}
		if g.Phantoms != 0 {
			r.Warnings = append(r.Warnings, fmt.Sprintf("qemu: VM %d: %d phantom callbacks (entries Linux cannot have written)", g.VM, g.Phantoms))
		}
		guests = append(guests, map[string]any{"vm": g.VM, "submitted": g.Submitted, "rejected": g.Rejected, "table_stores": g.TableStores,
			"narrow_stores": g.NarrowStores, "plugin_drops": g.Plugin.Drops, "boot_ns": g.Boot, "workload_ns": g.Workload,
			"phantoms": g.Phantoms, "present_callbacks": g.Present,
			"sync": b.cfg.Sync, "synced": g.Synced, "held_ns": g.Plugin.HeldNs, "denied": g.Denied, "reverted": g.Reverted, "give_ups": g.Plugin.GiveUps})
	}
	r.Stats = map[string]any{"wall_ns": b.sum.Wall, "guests": guests}
	return r
}
