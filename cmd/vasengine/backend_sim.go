package main

import (
	"context"
	"flag"
	"strings"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/sim"
	"github.com/vasengine/vasengine/engine"
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
	fs.IntVar(&f.vms, "vms", 8, "sim, kvm: number of VMs")
	fs.IntVar(&f.vcpus, "vcpus", 2, "sim, kvm: vCPUs per VM")
	fs.IntVar(&f.procs, "processes", 4, "sim: processes per VM at start")
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

func (f *simFlags) config() (sim.Config, error) {
	if f.vms < 1 || f.vcpus < 1 || f.procs < 1 {
		return sim.Config{}, usagef("-vms, -vcpus and -processes must be at least 1")
	}
	if f.rate < 0 {
		return sim.Config{}, usagef("-rate %v: must not be negative", f.rate)
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
	return sim.Config{VMs: f.vms, VCPUs: f.vcpus, Processes: f.procs, Profile: f.profile, Mode: mode,
		Seed: f.seed, Rate: f.rate, Burst: burst, MaxEvents: f.events}, nil
}

func (f *simFlags) backend() (backendRun, error) {
	cfg, err := f.config()
	if err != nil {
		return nil, err
	}
	s, err := sim.New(cfg)
	if err != nil {
		return nil, usagef("%v", err)
	}
	return func(ctx context.Context, host engine.Host, req backends.Request) error {
		return s.Run(ctx, host, req)
	}, nil
}
