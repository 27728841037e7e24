package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/sim"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/plan"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/trace"
	"github.com/vasengine/vasengine/vasmon"
)

// planFlags are plan's flags.
type planFlags struct {
	engineFlags
	fromReport, tracePath, promPath, promTime string
	profile                                   string
	vmRate, headroom, vmBurst                 float64
	vcpus, vms                                int
	mem, plotPath                             string
	step                                      time.Duration
	quick                                     bool
	// sync: every store of the simulated guests synchronous; the curve's
	// latencies are then stalls (see latencyOf).
	sync bool
	// sweep: plan with every shard count, keep the best (-shards-sweep).
	sweep bool
	seed  uint64
	vf    verifyFlags
}

// defaultVMRate is -vm-rate's default, the same as run's -rate.
const defaultVMRate = 20000

// register defines plan's flags on fs: the engine's configuration flags
// of run, and plan's own.
func (f *planFlags) register(fs *flag.FlagSet) {
	all := flag.NewFlagSet("", flag.ContinueOnError)
	f.engineFlags.register(all) // of run's engine flags, plan takes those configuring the engine
	for _, name := range []string{"shards", "cpus", "batch", "queue-depth", "budget", "nonblocking", "vm-max-rate", "vm-max-burst", "vm-share"} {
		fl := all.Lookup(name)
		fs.Var(fl.Value, name, fl.Usage)
	}
	fs.StringVar(&f.fromReport, "from-report", "", "read the cost curve from this saved `go test -bench` output (its BenchmarkLatency lines for -shards, e.g. bench/results/bench.txt) instead of measuring it")
	fs.StringVar(&f.profile, "profile", "web", "simulator profile the cost curve is measured with, and the workload unless -trace or -prom ("+strings.Join(sim.Profiles(), ", ")+")")
	fs.Float64Var(&f.vmRate, "vm-rate", defaultVMRate, "events/s each VM produces under -profile (a profile has no rate of its own: say what your guests do)")
	fs.StringVar(&f.tracePath, "trace", "", "take the workload from this recorded trace (rates per VM, bursts, tables)")
	fs.StringVar(&f.promPath, "prom", "", "take the workload from this Prometheus text snapshot of vasengine's /metrics")
	fs.StringVar(&f.promTime, "prom-time", "", "when the -prom snapshot was scraped (RFC 3339 or Unix seconds; default: its samples' timestamps, else the file's modification time)")
	fs.IntVar(&f.vcpus, "vcpus", 2, "vCPUs per VM (of the planned VMs, and of the simulated ones)")
	fs.IntVar(&f.vms, "vms", 8, "VMs of the workload measured first (the search for the planned VMs starts there; with -from-report, the simulated VMs measuring the workload)")
	fs.Float64Var(&f.headroom, "headroom", 0.2, "fraction of every resource (CPU rate within budget, queues, memory) kept free, in [0, 1)")
	fs.StringVar(&f.mem, "mem", "", "host memory the tables may use, e.g. 8GiB (K, M, G, T are powers of 1024; default: half of MemTotal)")
	fs.Float64Var(&f.vmBurst, "vm-burst", 0, "most events one VM submits within 1 ms (default: measured; for -prom, assumed)")
	fs.StringVar(&f.plotPath, "plot", "", "write an SVG plot of the curve, the budget and the plan to this file (a folder: plan.svg in it); none unless given")
	fs.DurationVar(&f.step, "step", time.Second, "measurement time per point of the curve")
	fs.BoolVar(&f.sync, "sync", false, "plan for synchronous roots (SEMANTICS.md section 7): every store of the simulated guests synchronous, and the curve's latencies, -budget included, are the stall the engine adds to the writing vCPU (trap to its release) instead of trap-to-callback; -profile workloads only")
	fs.BoolVar(&f.sweep, "shards-sweep", false, "plan with every shard count from 1 to the CPUs this process may use, and answer with the fewest shards that fit the most VMs (and the cores to reserve for them when pinned with -cpus); -profile, -trace or -prom workloads measured at scale")
	fs.BoolVar(&f.quick, "quick", false, "a short measurement (4 runs of 150 ms; overrides -step): a smoke test, not a plan")
	fs.Uint64Var(&f.seed, "seed", 1, "simulator seed")
	f.vf.register(fs)
}

// cmdPlan is "vasengine plan": how many VMs this host can monitor within the
// latency budget, from the engine's cost curve measured now (or read from a
// saved benchmark output) and a workload per VM (a simulator profile at a
// given rate, a recorded trace, or a Prometheus snapshot). See package plan.
func cmdPlan(args []string, stdout, stderr io.Writer) error {
	var f planFlags
	fs := flag.NewFlagSet("plan", flag.ContinueOnError)
	f.register(fs)
	if err := parse(fs, args, stdout); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("plan: unexpected argument %q", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	cfg, err := f.engineFlags.config()
	if err != nil {
		return err
	}
	switch {
	case !(f.headroom >= 0 && f.headroom < 1):
		return usagef("-headroom %v: must be in [0, 1)", f.headroom)
	case f.vcpus < 1 || f.vms < 1:
		return usagef("-vcpus and -vms must be at least 1")
	case !(f.vmRate > 0) || !finite(f.vmRate):
		return usagef("-vm-rate %v: must be a positive number", f.vmRate)
	case !(f.vmBurst >= 0) || !finite(f.vmBurst):
		return usagef("-vm-burst %v: must be a number, not negative", f.vmBurst)
	case f.step <= 0:
		return usagef("-step %v: must be positive", f.step)
	case f.tracePath != "" && f.promPath != "":
		return usagef("plan: -trace and -prom are two workloads: give one")
	case set["vm-rate"] && (f.tracePath != "" || f.promPath != ""):
		return usagef("plan: -vm-rate is for -profile; the rates come from the -trace or -prom file")
	case set["prom-time"] && f.promPath == "":
		return usagef("plan: -prom-time needs -prom")
	case f.sweep && set["shards"]:
		return usagef("plan: -shards-sweep tries every shard count: not with -shards")
	case f.sweep && f.fromReport != "":
		return usagef("plan: -shards-sweep measures each shard count at scale: not with -from-report")
	case f.sync && (f.tracePath != "" || f.promPath != "" || f.fromReport != ""):
		return usagef("plan: -sync measures synchronous stalls with the simulator's -profile: not with -trace, -prom or -from-report")
	}
	if err := f.vf.check(set); err != nil {
		return err
	}
	if _, err := sim.LookupProfile(f.profile); err != nil {
		return usagef("-profile: %v", err)
	}
	if f.vf.promise != "" {
		return f.verifyPromise(cfg, set["vm-rate"], stdout, stderr)
	}
	mem, err := memBytes(f.mem)
	if err != nil {
		return err
	}
	memNote := "memory for tables: -mem"
	if f.mem == "" {
		memNote = "memory for tables: half of MemTotal (set -mem)"
	}
	var plotPath string
	if f.plotPath != "" {
		if plotPath, err = resolvePlot(f.plotPath); err != nil {
			return err
		}
		if err := checkOutput("-plot", plotPath, false, f.fromReport, f.tracePath, f.promPath); err != nil {
			return err
		}
	}

	in := plan.Inputs{Budget: cfg.Budget, Headroom: f.headroom, Shards: cfg.Shards, QueueDepth: cfg.QueueDepth,
		MemBytes: mem, MaxVMs: 1024} // engine.New's default MaxVMs (no flag changes it)
	if in.Limits, err = f.limits.planLimits(); err != nil {
		return err
	}
	var bptNote string
	if f.fromReport != "" {
		pts, bpt, err := readReport(f.fromReport, cfg.Shards)
		if err != nil {
			return err
		}
		in.Curve = plan.Curve{Points: pts, Source: fmt.Sprintf("%s (BenchmarkLatency: its own engine configuration and workload, see bench/)", f.fromReport)}
		if in.BytesPerTable = bpt; bpt > 0 {
			bptNote = "bytes per table: BenchmarkStartMonitor/engine of " + f.fromReport
		}
	}
	var wl *plan.Workload
	var snap *plan.Snapshot
	switch {
	case f.tracePath != "":
		w, err := readTraceWorkload(f.tracePath)
		if err != nil {
			return err
		}
		w.Source = "trace " + f.tracePath
		wl = &w
	case f.promPath != "":
		s, err := readProm(f.promPath, f.promTime, set["prom-time"])
		if err != nil {
			return err
		}
		snap = s
		w, bpt := s.Workload()
		w.Source = "Prometheus snapshot " + f.promPath
		if f.vmBurst == 0 {
			w.BurstPerVM = float64(64*f.vcpus) + w.PeakRate*plan.BurstWindow.Seconds()
			w.Notes = append(w.Notes, "a snapshot has no bursts: assumed one 64-event batch per vCPU plus 1 ms of the busiest VM (set -vm-burst)")
		}
		if bpt > 0 {
			in.BytesPerTable, bptNote = bpt, "bytes per table: table memory over hooked tables in the snapshot"
		}
		wl = &w
	}

	// Measure what the inputs do not give: with a curve from a report,
	// the workload's tables and bursts in the simulator; else the curve
	// itself, with the workload at the scale of the plan.
	var sc *scaler
	var drv driver
	var p *plan.Plan
	if in.Curve.Points != nil {
		m := &measurer{cfg: cfg, sim: sim.Config{VMs: f.vms, VCPUs: f.vcpus, Processes: 4, Profile: f.profile, Seed: f.seed, Sync: f.sync},
			step: f.step, warm: 100 * time.Millisecond, stderr: stderr}
		if f.quick {
			m.step, m.warm = 150*time.Millisecond, 20*time.Millisecond
		}
		if wl == nil || in.BytesPerTable == 0 {
			r, err := m.phase("workload", f.vmRate, true)
			if err != nil {
				return err
			}
			if r.tables > 0 {
				in.BytesPerTable = float64(r.bytes) / float64(r.tables)
				bptNote = fmt.Sprintf("bytes per table: measured now in the simulator (profile %s, at the peak of %d hooked tables)", f.profile, r.tables)
			}
			if wl == nil {
				wl = &plan.Workload{Source: fmt.Sprintf("simulator profile %s at %s events/s per VM (the rate given by -vm-rate)", f.profile, plan.SI(f.vmRate)),
					VMs: f.vms, RatePerVM: f.vmRate, TablesPerVM: float64(r.tables) / float64(f.vms), BurstPerVM: float64(r.burst),
					Notes: []string{fmt.Sprintf("tables and bursts measured in the simulator: %d VMs x %d vCPUs, %d processes each at start", f.vms, f.vcpus, m.sim.Processes)}}
				if r.pt.Saturated {
					wl.Notes = append(wl.Notes, fmt.Sprintf("the simulator made only %s of the %s events/s per VM asked (the profile or this host cannot go faster): the plan uses the rate asked",
						plan.SI(r.pt.Achieved/float64(f.vms)), plan.SI(f.vmRate)))
				}
			}
		}
	} else {
		if wl == nil {
			wl = &plan.Workload{Source: fmt.Sprintf("simulator profile %s at %s events/s per VM (the rate given by -vm-rate)", f.profile, plan.SI(f.vmRate)),
				VMs: f.vms, RatePerVM: f.vmRate}
		}
		if f.vmBurst > 0 {
			wl.BurstPerVM = f.vmBurst
		}
		wl.VCPUsPerVM = f.vcpus
		drv = f.workloadDriver(wl.RatePerVM, wl.VMs)
		measured := in.BytesPerTable == 0
		in.Notes = []string{memNote, bptNote}
		var sweepNote string
		if f.sweep {
			best, note, err := f.sweepShards(in, *wl, drv, stderr)
			if err != nil {
				return err
			}
			f.shards, in.Shards, cfg.Shards, sweepNote = best, best, best, note
		}
		var err error
		if p, sc, err = f.planAtScale(in, *wl, drv, stderr, wl.BurstPerVM == 0); err != nil {
			return err
		}
		if sweepNote != "" {
			p.Inputs.Notes = append(p.Inputs.Notes, sweepNote)
		}
		in = p.Inputs
		wl = &in.Workload
		if measured {
			in.Notes[1] = "bytes per table: measured at the planned VMs (or the nearest measured), as the run summary counts them: host bytes at the sampled peak of hooked tables"
		}
		if f.tracePath != "" {
			wl.Notes = append(wl.Notes, "events/s per VM: what the trace's replay at its recorded pace made per VM (synthetic writes and restarts included), measured")
		}
		if f.promPath != "" {
			wl.Notes = append(wl.Notes, fmt.Sprintf("the snapshot's workload is measured (and verified) as simulator profile %s at its rate per VM", f.profile))
		}
		if sc.results[sc.firstN].burst > 0 && f.vmBurst == 0 && f.promPath == "" && f.tracePath == "" {
			wl.Notes = append(wl.Notes, fmt.Sprintf("burst measured with %d VMs", sc.firstN))
		}
		if sc.memMeasured {
			wl.Notes = append(wl.Notes, "tables per VM: measured at the planned VMs (or the nearest measured), the sampled peak of hooked tables")
		}
		in.Curve.Source = fmt.Sprintf("measured now at the plan's scale on %s: %d shards, queue depth %d, batch %d; each point: %s for %v after a %v warm-up",
			machine(), cfg.Shards, cfg.QueueDepth, cfg.MaxBatch, drv.describe(0), sc.step, sc.warm)
		if _, ok := sc.results[p.VMs]; !ok && p.VMs > 0 && p.VMs < plan.Unbounded {
			in.Curve.Notes = append(in.Curve.Notes, fmt.Sprintf("the planned %d VMs were not measured (-scale-runs %d spent): the prediction is interpolated", p.VMs, f.vf.runs))
		}
	}
	if f.sync {
		in.Curve.Notes = append(in.Curve.Notes, "-sync: every store of the simulated guests synchronous; the latencies (p50, p99, p99.9) and the budget are the stall the engine adds to the writing vCPU, from its trap to its release (SEMANTICS.md section 7), not trap-to-callback")
	}
	if snap != nil {
		addSnapshotPoint(&in.Curve, snap, cfg.Budget, sc == nil)
	}
	if f.vmBurst > 0 {
		wl.BurstPerVM = f.vmBurst
		wl.Notes = append(wl.Notes, "burst given by -vm-burst")
	}
	wl.VCPUsPerVM = f.vcpus
	in.Workload = *wl
	if sc == nil {
		in.Notes = []string{memNote, bptNote}
		drv = f.workloadDriver(wl.RatePerVM, wl.VMs)
	}
	p, err = plan.Compute(in)
	if err != nil {
		return usagef("plan: %v", err)
	}
	pr := promiseOf(p, sc, drv)
	if p.VMs > 0 && p.VMs < plan.Unbounded {
		p.LoadP99 = pr.P99 // the measurement at the planned VMs, when there is one
	}
	if err := p.WriteTable(stdout); err != nil {
		return err
	}
	if len(p.Inversions) > 0 {
		fmt.Fprintf(stderr, "vasengine: warning: the cost curve is not monotone (a measurement problem): the plan is not to be trusted\n")
	}
	writePrediction(stdout, p, pr)
	f.writeVerifyCommand(stdout, p, pr)
	if plotPath != "" {
		svg, err := p.PlotSVG()
		if err != nil {
			return fmt.Errorf("plan: plot: %w", err)
		}
		if err := writeOutput("-plot", plotPath, svg); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "plot: %s\n", plotPath)
	}
	if !f.vf.verify {
		return nil
	}
	if p.VMs == 0 || p.VMs == plan.Unbounded {
		return fmt.Errorf("verify: the plan has no configuration to run (%s VMs)", map[bool]string{true: "0", false: "unbounded"}[p.VMs == 0])
	}
	return f.runVerify(cfg, drv, pr, stdout, stderr)
}

// addSnapshotPoint puts what a Prometheus snapshot measured (its p99 at its
// own mean load) into the curve if inCurve (not into a curve measured at
// the plan's scale: the snapshot is of another scale, over its whole
// uptime), and says when it contradicts the curve.
func addSnapshotPoint(c *plan.Curve, snap *plan.Snapshot, budget time.Duration, inCurve bool) {
	pt, ok := snap.Point()
	if !ok {
		c.Notes = append(c.Notes, "the snapshot has no callback latency measured: the plan rests on the curve alone")
		return
	}
	want := c.P99At(pt.Rate())
	where := fmt.Sprintf("it is in the curve as the point %q", pt.Label)
	if inCurve {
		c.Points = append(c.Points, pt)
	} else {
		where = "it is not a point of this curve (another scale, over the whole uptime)"
	}
	beyond := ""
	if snap.P99Beyond {
		beyond = " (beyond the histogram's last bucket)"
	}
	note := fmt.Sprintf("the snapshot measured p99 %s%s over %.0f callbacks at its mean load of %s events/s; %s",
		plan.Dur(pt.P99), beyond, snap.Callbacks, plan.SI(pt.Rate()), where)
	switch {
	case (pt.P99 > budget) != (want > budget):
		note += fmt.Sprintf("; it CONTRADICTS the cost curve, which gives %s at that load (budget %v): the curve was not measured under this host's conditions", plan.Dur(want), budget)
	case float64(pt.P99) > 2*float64(want) || float64(want) > 2*float64(pt.P99):
		note += fmt.Sprintf("; the cost curve gives %s at that load, more than a factor of two away", plan.Dur(want))
	}
	c.Notes = append(c.Notes, note)
}

// memBytes parses -mem, or returns half of the host's MemTotal.
func memBytes(s string) (float64, error) {
	if s == "" {
		b, err := os.ReadFile("/proc/meminfo")
		if err == nil {
			for _, l := range strings.Split(string(b), "\n") {
				var kb float64
				if n, _ := fmt.Sscanf(l, "MemTotal: %g kB", &kb); n == 1 && kb > 0 {
					return kb * 1024 / 2, nil
				}
			}
		}
		return 0, usagef("-mem: cannot read MemTotal from /proc/meminfo: give -mem")
	}
	num := strings.TrimRight(s, "KMGTkmgtiIbB")
	unit := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(s[len(num):]), "B"), "I")
	v, err := strconv.ParseFloat(num, 64)
	shift := strings.Index("KMGT", unit) + 1
	if err != nil || !(v > 0) || len(unit) > 1 || (unit != "" && shift == 0) {
		return 0, usagef("-mem %q: want a size such as 8GiB, 512M or 1073741824", s)
	}
	if unit == "" {
		shift = 0
	}
	return v * float64(uint64(1)<<(10*shift)), nil
}

// resolvePlot returns the plot's file: path, or plan.svg in it if it is a
// folder. Its folder must exist.
func resolvePlot(path string) (string, error) {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		return filepath.Join(path, "plan.svg"), nil
	}
	if st, err := os.Stat(filepath.Dir(path)); err != nil || !st.IsDir() {
		return "", usagef("-plot %s: no folder %s", path, filepath.Dir(path))
	}
	return path, nil
}

func readReport(path string, shards int) ([]plan.Point, float64, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, 0, usagef("-from-report: %v", err)
	}
	defer file.Close()
	pts, bpt, err := plan.ParseReport(file, shards)
	if err != nil {
		return nil, 0, usagef("-from-report %s: %v", path, err)
	}
	return pts, bpt, nil
}

func readTraceWorkload(path string) (plan.Workload, error) {
	file, err := os.Open(path)
	if err != nil {
		return plan.Workload{}, usagef("-trace: %v", err)
	}
	defer file.Close()
	r, err := trace.NewReader(bufio.NewReaderSize(file, 1<<20), trace.ReaderOptions{})
	if err != nil {
		return plan.Workload{}, usagef("-trace %s: %v", path, err)
	}
	w, err := plan.ReadTrace(r)
	if err != nil {
		return plan.Workload{}, usagef("-trace %s: %v", path, err)
	}
	return w, nil
}

func readProm(path, at string, given bool) (*plan.Snapshot, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, usagef("-prom: %v", err)
	}
	defer file.Close()
	st, err := file.Stat()
	if err != nil {
		return nil, usagef("-prom: %v", err)
	}
	t := st.ModTime()
	if given {
		if t, err = parseTime(at); err != nil {
			return nil, err
		}
	}
	snap, err := plan.ParseProm(file, t)
	if err != nil {
		return nil, usagef("-prom %s: %v", path, err)
	}
	if given {
		snap.At = t // the flag overrides the samples' timestamps
		if !snap.At.After(snap.Start) {
			return nil, usagef("-prom-time %s: not after the process start %s", at, snap.Start.Format(time.RFC3339))
		}
	}
	return snap, nil
}

func parseTime(s string) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	if v, err := strconv.ParseFloat(s, 64); err == nil && v > 0 {
		return time.Unix(0, int64(v*1e9)), nil
	}
	return time.Time{}, usagef("-prom-time %q: want RFC 3339 (2026-01-02T15:04:05Z) or Unix seconds", s)
}

func machine() string {
	model := ""
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if name, ok := strings.CutPrefix(l, "model name"); ok {
				model = " (" + strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(name), ":")) + ")"
				break
			}
		}
	}
	return fmt.Sprintf("%d CPUs%s", runtime.NumCPU(), model)
}

// measurer runs the engine on the simulator, one fresh engine and
// simulation per point.
type measurer struct {
	cfg        engine.Config
	sim        sim.Config
	step, warm time.Duration
	stderr     io.Writer
}

type phaseResult struct {
	pt            plan.Point
	tables, bytes int64 // hooked tables at their peak, and their host bytes then
	burst         int   // most events one VM submitted within 1 ms
}

// phase runs the simulator at rate events/s per VM (0: as fast as
// possible) until its initial processes are monitored, lets it warm up,
// then measures for the step: latency percentiles (the difference of the
// histograms at both ends), events/s processed, the peak of hooked tables
// and, if bursts, each VM's largest burst.
func (m *measurer) phase(label string, rate float64, bursts bool) (phaseResult, error) {
	var res phaseResult
	e, err := engine.New(m.cfg)
	if err != nil {
		return res, usagef("%v", err)
	}
	defer e.Close()
	sc := m.sim
	sc.Rate = rate
	s, err := sim.New(sc)
	if err != nil {
		return res, usagef("%v", err)
	}
	var host engine.Host = e
	bh := &burstHost{Host: e}
	if bursts {
		host = bh
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, host, backends.Request{Monitored: backends.DefaultMonitored}) }()
	ended := func(err error) error {
		return fmt.Errorf("plan: %s: the simulation ended early: %v", label, err)
	}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	boot := time.Now()
	for st := s.Stats(); st.RootsStarted+st.StartErrors < uint64(sc.VMs*sc.Processes) && time.Since(boot) < 10*time.Second; st = s.Stats() {
		select {
		case err := <-done:
			return res, ended(err)
		case <-tick.C:
		}
	}
	sample := func() {
		if st := e.Stats(); st.Tables > res.tables {
			res.tables, res.bytes = st.Tables, st.HostBytes
		}
	}
	var a, b engine.Stats
	var ta, tb time.Time
	for phase, d := range []time.Duration{m.warm, m.step} {
		end := time.Now().Add(d)
		for time.Now().Before(end) {
			select {
			case err := <-done:
				return res, ended(err)
			case <-tick.C:
				sample()
			}
		}
		if phase == 0 {
			a, ta = e.Stats(), time.Now()
			bh.on.Store(true)
		}
	}
	b, tb = e.Stats(), time.Now()
	bh.on.Store(false)
	cancel()
	if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
		return res, fmt.Errorf("plan: %s: %w", label, err)
	}
	h := latencyOf(&a, &b, m.sim.Sync)
	processed := b.Processed - a.Processed
	if processed == 0 {
		return res, fmt.Errorf("plan: %s: no event processed in %v (raise -step or -vm-rate)", label, m.step)
	}
	res.pt = plan.Point{Label: label, Offered: rate * float64(sc.VMs), Achieved: float64(processed) / tb.Sub(ta).Seconds(),
		P50: time.Duration(h.Quantile(0.5)), P99: time.Duration(h.Quantile(0.99)), P999: time.Duration(h.Quantile(0.999))}
	res.pt.Saturated = res.pt.Offered > 0 && res.pt.Achieved < plan.SaturationRatio*res.pt.Offered
	res.burst = bh.max()
	fmt.Fprintf(m.stderr, "plan: %-9s %10s events/s  p99 %v\n", label, plan.SI(res.pt.Achieved), time.Duration(h.Quantile(0.99)))
	return res, nil
}

// sweepShards plans with every shard count from 1 to the CPUs this
// process may use and returns the fewest shards that fit the most VMs,
// with a note for the report that says what each count fitted.
func (f *planFlags) sweepShards(in plan.Inputs, wl plan.Workload, drv driver, stderr io.Writer) (int, string, error) {
	allowed, err := shard.AllowedCPUs()
	if err != nil || len(allowed) == 0 {
		allowed = make([]int, runtime.NumCPU())
	}
	best, bestVMs := 0, -1
	var fits []string
	for n := 1; n <= len(allowed); n++ {
		g := *f
		g.shards, g.sweep = n, false
		q := in
		q.Shards = n
		fmt.Fprintf(stderr, "plan: -shards-sweep: %d shards\n", n)
		p, _, err := g.planAtScale(q, wl, drv, stderr, wl.BurstPerVM == 0)
		if err != nil {
			return 0, "", err
		}
		vms := p.VMs
		fits = append(fits, fmt.Sprintf("%d shards: %s VMs", n, vmCount(vms)))
		if vms > bestVMs {
			best, bestVMs = n, vms
		}
	}
	cores := "unpinned (the default), they share the host's cores"
	if f.cpus != "" {
		cores = fmt.Sprintf("pinned with -cpus, reserve %d cores for them", best)
	}
	return best, fmt.Sprintf("-shards-sweep: %s; planned with %d shards, the fewest that fit the most VMs; %s",
		strings.Join(fits, ", "), best, cores), nil
}

// vmCount prints a plan's VM count.
func vmCount(n int) string {
	if n == plan.Unbounded {
		return "unbounded"
	}
	return strconv.Itoa(n)
}

// latencyOf is the latency a plan's curve is made of, from engine
// statistics a to b: trap-to-callback, or with sync the stall that
// synchronous writes add to their vCPU (trap to release, Stats.SyncStall).
func latencyOf(a, b *engine.Stats, sync bool) shard.HistSnapshot {
	if sync {
		h := b.SyncStall
		h.Sub(&a.SyncStall)
		return h
	}
	h := b.Latency
	h.Sub(&a.Latency)
	return h
}

// burstHost passes everything to the engine and, while on, meters each
// VM's bursts from its events' trap times.
type burstHost struct {
	engine.Host
	on  atomic.Bool
	vms sync.Map // vasmon.VMID -> *vmBurst
}

type vmBurst struct {
	mu sync.Mutex
	m  plan.BurstMeter
}

func (h *burstHost) Submit(vm vasmon.VMID, evs []shard.Event) (int, error) {
	h.meter(vm, evs)
	return h.Host.Submit(vm, evs)
}

// meter counts evs of vm in its burst meter, while on.
func (h *burstHost) meter(vm vasmon.VMID, evs []shard.Event) {
	if !h.on.Load() {
		return
	}
	v, ok := h.vms.Load(vm)
	if !ok {
		v, _ = h.vms.LoadOrStore(vm, new(vmBurst))
	}
	b := v.(*vmBurst)
	now := shard.Now()
	b.mu.Lock()
	for i := range evs {
		t := evs[i].Trap
		if t == 0 {
			t = now
		}
		b.m.Add(t)
	}
	b.mu.Unlock()
}

// SyncSubmitter implements backends.SyncHost (plan -sync): the wrapped
// host's Syncers, their writes metered too.
func (h *burstHost) SyncSubmitter(vm vasmon.VMID) (backends.Syncer, error) {
	s, err := backends.NewSyncer(h.Host, vm)
	if err != nil {
		return nil, err
	}
	return &meteredSyncer{Syncer: s, h: h, vm: vm}, nil
}

type meteredSyncer struct {
	backends.Syncer
	h  *burstHost
	vm vasmon.VMID
}

func (s *meteredSyncer) Submit(evs []shard.Event) (shard.Verdict, error) {
	s.h.meter(s.vm, evs)
	return s.Syncer.Submit(evs)
}

func (h *burstHost) max() int {
	n := 0
	h.vms.Range(func(_, v any) bool {
		b := v.(*vmBurst)
		b.mu.Lock()
		n = max(n, b.m.Max)
		b.mu.Unlock()
		return true
	})
	return n
}
