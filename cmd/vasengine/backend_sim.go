package main

import (
	"context"
	"flag"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/sim"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/plan"
	"github.com/vasengine/vasengine/vasmon"
)

type simFlags struct {
	vms, vcpus, procs int
	profile, mode     string
	seed              uint64
	rate              float64
	burst             string
	events            uint64
}

func (f *simFlags) register(fs *flag.FlagSet) {
	fs.IntVar(&f.vms, "vms", 8, fmt.Sprintf("sim, kvm: number of VMs (1..%d, the engine's VM slots)", maxVMs))
	fs.IntVar(&f.vcpus, "vcpus", 2, fmt.Sprintf("sim, kvm: vCPUs per VM (sim: 1..%d, kvm: 1..16)", maxVCPUs))
	fs.IntVar(&f.procs, "processes", 4, fmt.Sprintf("sim: processes per VM at start (1..%d)", maxProcesses))
	fs.StringVar(&f.profile, "profile", "web", "sim: workload profile ("+strings.Join(sim.Profiles(), ", ")+")")
	fs.StringVar(&f.mode, "mode", "mixed", "sim, kvm: paging mode (32-bit, pae, 4-level, 5-level, or mixed: VM i uses mode i mod 4)")
	fs.Uint64Var(&f.seed, "seed", 1, "sim, kvm: random seed")
	fs.Float64Var(&f.rate, "rate", 20000, "sim: trapped events per second per VM (0: as fast as possible)")
	fs.StringVar(&f.burst, "burst", "", "sim: on/off burst shape, e.g. 100ms/900ms (default steady)")
	fs.Uint64Var(&f.events, "events", 0, "sim: stop after this many events (0: run for -duration)")
}

func parseMode(s string) (vasmon.Mode, error) {
	if s == "mixed" || s == "" {
		return 0, nil
	}
	m, err := vasmon.ParseMode(s)
	if err != nil {
		return 0, usagef("-mode: %v", err)
	}
	return m, nil
}

// checkVMs checks -vms against the engine's VM slots.
func checkVMs(flag string, n int) error {
	if n < 1 || n > maxVMs {
		return usagef("%s %d: must be within 1..%d (the engine's VM slots)", flag, n, maxVMs)
	}
	return nil
}

func (f *simFlags) config() (sim.Config, error) {
	if err := checkVMs("-vms", f.vms); err != nil {
		return sim.Config{}, err
	}
	if f.vcpus < 1 || f.vcpus > maxVCPUs {
		return sim.Config{}, usagef("-vcpus %d: must be within 1..%d", f.vcpus, maxVCPUs)
	}
	if f.procs < 1 || f.procs > maxProcesses {
		return sim.Config{}, usagef("-processes %d: must be within 1..%d", f.procs, maxProcesses)
	}
	if !(f.rate >= 0) || !finite(f.rate) {
		return sim.Config{}, usagef("-rate %v: must be a finite number, not negative", f.rate)
	}
	if _, err := sim.LookupProfile(f.profile); err != nil {
		return sim.Config{}, usagef("-profile: %v", err)
	}
	mode, err := parseMode(f.mode)
	if err != nil {
		return sim.Config{}, err
	}
	burst, err := sim.ParseBurst(f.burst)
	if err != nil {
		return sim.Config{}, usagef("-burst: %v", err)
	}
	if err := checkMemory(fmt.Sprintf("-vms %d", f.vms), int64(f.vms)*simBytesPerVM); err != nil {
		return sim.Config{}, err
	}
	return sim.Config{VMs: f.vms, VCPUs: f.vcpus, Processes: f.procs, Profile: f.profile, Mode: mode,
		Seed: f.seed, Rate: f.rate, Burst: burst, MaxEvents: f.events}, nil
}

func (f *simFlags) backend() (backend, error) {
	cfg, err := f.config()
	if err != nil {
		return nil, err
	}
	return &simBackend{cfg: cfg}, nil
}

// simBackend runs the simulator.
type simBackend struct {
	cfg   sim.Config
	limit float64 // -vm-max-rate (0: none): the rate offered is at most that
	mu    sync.Mutex
	s     *sim.Sim
}

func (b *simBackend) setSync() error {
	b.cfg.Sync = true
	return nil
}

func (b *simBackend) describe() string {
	mode := "mixed paging modes"
	if b.cfg.Mode != 0 {
		mode = b.cfg.Mode.String()
	}
	rate := "as fast as possible"
	if b.cfg.Rate > 0 {
		rate = fmt.Sprintf("%s events/s each", si(b.cfg.Rate))
	}
	return fmt.Sprintf("%d simulated VMs (%s profile, %s, %d vCPUs, %s)", b.cfg.VMs, b.cfg.Profile, mode, b.cfg.VCPUs, rate)
}

func (b *simBackend) prepare(context.Context) error {
	s, err := sim.New(b.cfg)
	if err != nil {
		return usagef("%v", err)
	}
	b.mu.Lock()
	b.s = s
	b.mu.Unlock()
	return nil
}

func (b *simBackend) run(ctx context.Context, host engine.Host, req backends.Request) error {
	return b.s.Run(ctx, host, req)
}

// offered is the rate asked of the simulator, in events/s (0: as fast as
// possible): -rate per VM during the on periods of -burst.
func (b *simBackend) offered() float64 {
	r := b.cfg.Rate * float64(b.cfg.VMs)
	if b.limit > 0 && b.cfg.Rate > b.limit {
		r = b.limit * float64(b.cfg.VMs)
	}
	if on, off := b.cfg.Burst.On, b.cfg.Burst.Off; on > 0 && off > 0 {
		r *= float64(on) / float64(on+off)
	}
	return r
}

func (b *simBackend) report(ran time.Duration) backendReport {
	b.mu.Lock()
	s := b.s
	b.mu.Unlock()
	if s == nil {
		return backendReport{}
	}
	st := s.Stats()
	got := 0.0
	if ran > 0 {
		got = float64(st.Submitted) / ran.Seconds()
	}
	r := backendReport{Stats: map[string]any{"offered_per_second": b.offered(), "submitted_per_second": got,
		"submitted": st.Submitted, "rejected": st.Rejected, "stores": st.TotalWrites(), "trapped": st.TotalTrapped(),
		"roots_started": st.RootsStarted, "roots_stopped": st.RootsStopped, "start_errors": st.StartErrors,
		"stop_errors": st.StopErrors, "oom": st.OOM, "processes": st.Processes}}
	r.Lines = append(r.Lines, fmt.Sprintf("sim: %d events submitted (%s/s), %d rejected; %d roots started, %d stopped, %d start errors, %d stop errors",
		st.Submitted, si(got), st.Rejected, st.RootsStarted, st.RootsStopped, st.StartErrors, st.StopErrors))
	if off := b.offered(); off > 0 && ran >= time.Second && got < plan.SaturationRatio*off {
		rate := "-rate " + si(b.cfg.Rate)
		if b.limit > 0 && b.cfg.Rate > b.limit {
			rate = "-vm-max-rate " + si(b.limit)
		}
		r.Warnings = append(r.Warnings, fmt.Sprintf("asked %s events/s (%s x %d VMs%s), got %s/s: the simulator and the engine could not keep up on this host",
			si(off), rate, b.cfg.VMs, burstNote(b.cfg.Burst), si(got)))
	}
	return r
}

func burstNote(b sim.Burst) string {
	if b.On > 0 && b.Off > 0 {
		return fmt.Sprintf(", on %v of every %v", b.On, b.On+b.Off)
	}
	return ""
}
