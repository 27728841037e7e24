package kvm

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/vasmon"
)

// Mode is how guest page-table writes reach the engine.
type Mode uint8

const (
	// Trap write-protects every hooked table page (a read-only memslot):
	// each guest write exits to the host, is applied, and is submitted as
	// an event before the vCPU goes on. Exact and synchronous.
	Trap Mode = iota
	// Dirty write-protects nothing: dirtied pages are harvested from the
	// KVM dirty ring and diffed against shadow copies (see dirty.go).
	Dirty
)

func (m Mode) String() string {
	switch m {
	case Trap:
		return "trap"
	case Dirty:
		return "dirty"
	}
	return fmt.Sprintf("Mode(%d)", uint8(m))
}

// ParseMode parses "trap" or "dirty".
func ParseMode(s string) (Mode, error) {
	switch s {
	case "trap", "":
		return Trap, nil
	case "dirty":
		return Dirty, nil
	}
	return 0, fmt.Errorf("kvm: unknown mode %q (want trap or dirty)", s)
}

// Config configures Run.
type Config struct {
	VMs    int         // guests run at once; 0: 1
	VCPUs  int         // vCPUs per guest (1..16); 0: 2
	Mode   Mode        // Trap or Dirty
	Paging vasmon.Mode // guest paging mode; 0: 4-level
	Seed   uint64      // guest i uses Seed+i
	// Modes, if set, overrides Paging: guest i runs Modes[i%len(Modes)].
	Modes []vasmon.Mode
	// Iterations per vCPU; 0 runs until Duration has passed (or ctx ends).
	Iterations uint64
	Duration   time.Duration
	FirstID    vasmon.VMID // ID of the first guest; 0: 1
	// Sync submits every trapped write synchronously (VMConfig.Sync; trap
	// mode only).
	Sync bool
}

// Summary is what Run did.
type Summary struct {
	Mode    Mode // trap or dirty
	VMs     []VMStats
	Total   VMStats // sums (Elapsed: the longest run; FlipMax: the largest)
	Elapsed time.Duration
}

// TrapsPerSecond returns the trapped writes per second of guest run time,
// summed over guests.
func (s Summary) TrapsPerSecond() float64 { return s.perSecond(s.Total.Traps) }

// DirtyPagesPerSecond returns the dirty pages harvested per second of
// guest run time, summed over guests (dirty mode).
func (s Summary) DirtyPagesPerSecond() float64 { return s.perSecond(s.Total.DirtyPages) }

func (s Summary) perSecond(n uint64) float64 {
	if s.Elapsed <= 0 {
		return 0
	}
	return float64(n) / s.Elapsed.Seconds()
}

// FlipMean returns the mean time of a slot flip.
func (s Summary) FlipMean() time.Duration {
	if s.Total.Flips == 0 {
		return 0
	}
	return s.Total.FlipTime / time.Duration(s.Total.Flips)
}

// Paging returns the paging modes the guests ran, each once, in the order
// of the guests.
func (s Summary) Paging() []vasmon.Mode {
	var ms []vasmon.Mode
	for _, v := range s.VMs {
		if !slices.Contains(ms, v.Paging) {
			ms = append(ms, v.Paging)
		}
	}
	return ms
}

func (s Summary) String() string {
	t := s.Total
	fl := s.FlipMean()
	return fmt.Sprintf("%d VMs, %v: %d guest iterations, %d checks passed; %d traps (%.0f/s), %d events submitted "+
		"(%d rejected), %d roots started, %d stopped; %d slot flips (mean %v, max %v); %d dirty pages in %d harvests",
		len(s.VMs), s.Elapsed.Round(time.Millisecond), t.Ops, t.Checks, t.Traps, s.TrapsPerSecond(), t.Submitted,
		t.Rejected, t.RootsStarted, t.RootsStopped, t.Flips, fl, t.FlipMax, t.DirtyPages, t.Harvests)
}

// Run runs cfg.VMs guests concurrently on host, monitoring every address
// space they create with req, until each guest has done its iterations,
// cfg.Duration has passed, or ctx ends; then it removes the guests from the
// host and returns what they did. A paging mode this host cannot run
// (Probe) is an error before any guest is created. A guest failure is
// returned as an error (with the summary so far).
func Run(ctx context.Context, host engine.Host, cfg Config, req backends.Request) (Summary, error) {
	if cfg.VMs == 0 {
		cfg.VMs = 1
	}
	if cfg.FirstID == 0 {
		cfg.FirstID = 1
	}
	modes := cfg.Modes
	if len(modes) == 0 {
		modes = []vasmon.Mode{cmp.Or(cfg.Paging, vasmon.Mode4)}
	}
	for _, m := range modes {
		if err := Probe(m); err != nil {
			return Summary{Mode: cfg.Mode}, err
		}
	}
	if cfg.Iterations == 0 && cfg.Duration <= 0 {
		if _, ok := ctx.Deadline(); !ok {
			return Summary{}, errors.New("kvm: Run needs Iterations, Duration or a deadline")
		}
	}
	if cfg.Duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.Duration)
		defer cancel()
	}
	var vms []*VM
	var errs []error
	for i := 0; i < cfg.VMs; i++ {
		vm, err := NewVM(host, req, VMConfig{ID: cfg.FirstID + vasmon.VMID(i), Paging: modes[i%len(modes)], VCPUs: cfg.VCPUs,
			Seed: cfg.Seed + uint64(i), Iterations: cfg.Iterations, Mode: cfg.Mode, Sync: cfg.Sync})
		if err != nil {
			errs = append(errs, err)
			break
		}
		vms = append(vms, vm)
	}
	t0 := time.Now()
	var mu sync.Mutex
	var wg sync.WaitGroup
	if len(errs) == 0 {
		for _, vm := range vms {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := vm.Run(ctx); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
	}
	sum := Summary{Mode: cfg.Mode, Elapsed: time.Since(t0)}
	for _, vm := range vms {
		st := vm.Stats()
		if err := vm.Close(context.Background()); err != nil {
			errs = append(errs, err)
		}
		sum.VMs = append(sum.VMs, st)
		sum.Total.add(st)
	}
	sum.Total.Elapsed = sum.Elapsed
	return sum, errors.Join(errs...)
}

func (t *VMStats) add(s VMStats) {
	t.Traps += s.Traps
	t.SyncWrites += s.SyncWrites
	t.Denied += s.Denied
	t.Windows += s.Windows
	t.Submitted += s.Submitted
	t.Rejected += s.Rejected
	t.Reads += s.Reads
	t.IOExits += s.IOExits
	t.IntrExits += s.IntrExits
	t.RootsStarted += s.RootsStarted
	t.RootsStopped += s.RootsStopped
	t.Checks += s.Checks
	t.Ops += s.Ops
	t.Zaps += s.Zaps
	t.Flips += s.Flips
	t.FlipTime += s.FlipTime
	t.FlipMax = max(t.FlipMax, s.FlipMax)
	t.Harvests += s.Harvests
	t.DirtyPages += s.DirtyPages
}
