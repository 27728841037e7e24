package main

import (
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/vasengine/vasengine/backends/sim"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/plan"
	"github.com/vasengine/vasengine/vmlimit"
)

// verifyFlags are plan's flags for measuring at scale and verifying.
type verifyFlags struct {
	verify   bool
	duration time.Duration
	promise  string
	runs     int
}

// defaultVerifyDuration is -verify-duration's default: short, the plan's
// own measurements at scale are a second each.
const defaultVerifyDuration = 3 * time.Second

func (v *verifyFlags) register(fs *flag.FlagSet) {
	fs.BoolVar(&v.verify, "verify", false, "after planning, run the planned configuration for -verify-duration and print predicted against measured for every constraint; exit 1 if the run breaks the plan's promise (p99 over the budget, the planned load not sustained, queues or table memory over what the plan kept)")
	fs.DurationVar(&v.duration, "verify-duration", defaultVerifyDuration, "-verify: how long the planned configuration is measured (after its VMs are up and a 100 ms warm-up)")
	fs.StringVar(&v.promise, "promise", "", "-verify: verify this promise (the key=value list a plan prints in its verify command) instead of planning again")
	fs.IntVar(&v.runs, "scale-runs", 8, "most runs of the workload at different VM counts while planning (the search for the budget's crossing, then the planned VMs for -verify-duration); -quick: 4")
}

// check checks the flags against the others; set: the flags given.
func (v *verifyFlags) check(set map[string]bool) error {
	switch {
	case v.duration <= 0:
		return usagef("-verify-duration %v: must be positive", v.duration)
	case v.promise != "" && !v.verify:
		return usagef("plan: -promise is for -verify")
	case set["verify-duration"] && !v.verify:
		return usagef("plan: -verify-duration is for -verify")
	case v.runs < 1:
		return usagef("-scale-runs %d: must be at least 1", v.runs)
	}
	return nil
}

// workloadDriver is the driver of plan's workload: the trace's copies for
// -trace, else the simulator's -profile at rate per VM.
func (f *planFlags) workloadDriver(rate float64, traceVMs int) driver {
	if f.tracePath != "" {
		return &traceDriver{path: f.tracePath, traceVMs: max(1, traceVMs)}
	}
	return &simDriver{cfg: sim.Config{VCPUs: f.vcpus, Processes: 4, Profile: f.profile, Seed: f.seed, Rate: rate, Sync: f.sync}}
}

// planAtScale measures the workload at scale, searching the VM count that
// crosses the budget, and returns the plan computed from those
// measurements and the scaler holding them. in has everything but the
// curve; wl is the workload (its tables and burst, when zero, are taken
// from the first measurement).
func (f *planFlags) planAtScale(in plan.Inputs, wl plan.Workload, drv driver, stderr io.Writer, measureBurst bool) (*plan.Plan, *scaler, error) {
	sc := &scaler{cfg: engine.Config{}, drv: drv, rate: wl.RatePerVM, step: f.step, warm: 100 * time.Millisecond, stderr: stderr, results: map[int]*scaleResult{}, sync: f.sync,
		memMeasured: in.BytesPerTable == 0 && wl.TablesPerVM == 0}
	runs := f.vf.runs
	if f.quick {
		sc.step, sc.warm = 150*time.Millisecond, 20*time.Millisecond
		runs = min(runs, 4)
	}
	var err error
	if sc.cfg, err = f.engineFlags.config(); err != nil {
		return nil, nil, err
	}
	sc.limit = vmlimit.Config{Rate: f.limits.maxRate, Burst: f.limits.burst}
	if sc.limit.Rate > 0 {
		sc.rate = min(sc.rate, sc.limit.Rate) // what reaches the engine
	}
	baseBPT, baseTables := in.BytesPerTable, wl.TablesPerVM
	// The workload's tables and bytes per table: of the measurement at
	// the planned VMs when there is one, else of the nearest.
	nearest := func(n int) *scaleResult {
		var best *scaleResult
		for m, r := range sc.results {
			if best == nil || abs(m-n) < abs(best.n-n) {
				best = r
			}
		}
		return best
	}
	compute := func() (*plan.Plan, error) {
		q := in
		w := wl
		first := sc.results[sc.firstN]
		if w.BurstPerVM == 0 && first != nil && measureBurst {
			w.BurstPerVM = float64(first.burst)
		}
		if _, replayed := drv.(*traceDriver); replayed && first != nil {
			// A replay submits more than the trace's events (synthetic
			// writes for pages hooked before their Page record; each loop
			// starts its VMs again): the rate per VM is what it made.
			w.RatePerVM = first.pt.Achieved / float64(first.vms)
		}
		guess := in
		guess.Curve = plan.Curve{Points: sc.curve()}
		guess.Workload = w
		p0, err := plan.Compute(fill(guess, nearest(sc.firstN), baseBPT, baseTables))
		if err != nil {
			return nil, err
		}
		r := nearest(p0.VMs)
		q.Curve = guess.Curve
		q.Workload = w
		return plan.Compute(fill(q, r, baseBPT, baseTables))
	}
	// Beyond the other constraints' VMs and the engine's VM slots, the
	// latency cannot bind: the search stops there.
	limit := maxVMs
	sc.firstN = f.vms
	if _, err := sc.at(sc.firstN, measureBurst, sc.step); err != nil {
		return nil, nil, err
	}
	if p, err := compute(); err == nil {
		for i, c := range p.Constraints {
			if c.Name != plan.CPU && c.VMs < plan.Unbounded {
				limit = min(limit, int(float64(p.Constraints[i].VMs)/(1-in.Headroom))+1)
			}
		}
	}
	final := f.vf.duration
	if f.quick {
		final = min(final, 4*sc.step)
	}
	p, err := sc.search(sc.firstN, limit, runs, in.Budget, final, compute)
	if err != nil {
		return nil, nil, err
	}
	return p, sc, nil
}

// fill sets the plan's memory figures from a measurement r (the run
// summary's accounting: host bytes at the peak of hooked tables), unless
// the inputs gave them.
func fill(in plan.Inputs, r *scaleResult, bpt, tablesPerVM float64) plan.Inputs {
	if r == nil || r.tables == 0 {
		return in
	}
	if tablesPerVM == 0 {
		in.Workload.TablesPerVM = float64(r.tables) / float64(r.vms)
	}
	if bpt == 0 {
		in.BytesPerTable = float64(r.bytes) / float64(r.tables)
	}
	return in
}

func abs(x int) int { return max(x, -x) }

// promiseOf is what plan p promises: its predictions at its VMs are those
// of the measurement at that scale when there is one, else interpolated
// on the curve; its limits are the constraints' capacities after headroom.
func promiseOf(p *plan.Plan, sc *scaler, drv driver) plan.Promise {
	w := p.Workload
	if p.Limits.MaxRate > 0 {
		w.RatePerVM = min(w.RatePerVM, p.Limits.MaxRate) // what reaches the engine
	}
	pr := plan.Promise{VMs: p.VMs, VCPUs: max(w.VCPUsPerVM, 1), RatePerVM: w.RatePerVM, Budget: p.Budget,
		Events: w.RatePerVM * float64(drv.vms(p.VMs)), QueuePeak: float64(p.VMs) * w.BurstPerVM,
		BytesPerTable: p.BytesPerTable, MemBytes: float64(drv.vms(p.VMs)) * w.TablesPerVM * p.BytesPerTable}
	pr.P50, pr.P99, pr.P999 = p.Curve.QuantilesAt(pr.Events)
	for _, c := range p.Constraints {
		switch c.Name {
		case plan.Queues:
			pr.QueueHave = c.Have
		case plan.Memory:
			pr.MemHave = c.Have
		}
	}
	if sc != nil {
		if r := sc.results[p.VMs]; r != nil {
			pr.P50, pr.P99, pr.P999 = r.pt.P50, r.pt.P99, r.pt.P999
			if sc.memMeasured && r.tables > 0 {
				pr.BytesPerTable = float64(r.bytes) / float64(r.tables)
				pr.MemBytes = float64(r.bytes)
			}
		}
	}
	return pr
}

// verifyCommand is the command that verifies promise pr of the plan made
// with flags f.
func (f *planFlags) verifyCommand(pr plan.Promise) string {
	args := []string{"vasengine", "plan", "-verify", "-verify-duration", f.vf.duration.String()}
	switch {
	case f.tracePath != "":
		args = append(args, "-trace", shellQuote(f.tracePath))
	case f.promPath != "":
		args = append(args, "-prom", shellQuote(f.promPath), "-profile", f.profile)
	default:
		args = append(args, "-profile", f.profile)
		if f.vmRate != pr.RatePerVM {
			// The workload offers more than its limit lets through.
			args = append(args, "-vm-rate", strconv.FormatFloat(f.vmRate, 'f', -1, 64))
		}
	}
	args = append(args, "-shards", strconv.Itoa(f.shards), "-queue-depth", strconv.Itoa(f.queue), "-batch", strconv.Itoa(f.batch),
		"-budget", f.budget.String())
	if f.sync {
		args = append(args, "-sync")
	}
	if f.cpus != "" {
		args = append(args, "-cpus", f.cpus)
	}
	if f.nonblocking {
		args = append(args, "-nonblocking")
	}
	if f.limits.maxRate > 0 {
		args = append(args, "-vm-max-rate", strconv.FormatFloat(f.limits.maxRate, 'f', -1, 64))
		if f.limits.burst > 0 {
			args = append(args, "-vm-max-burst", strconv.Itoa(f.limits.burst))
		}
	}
	if f.limits.share > 0 {
		args = append(args, "-vm-share", strconv.Itoa(f.limits.share))
	}
	args = append(args, "-seed", strconv.FormatUint(f.seed, 10), "-promise", pr.String())
	return strings.Join(args, " ")
}

func shellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r == '/' || r == '.' || r == '-' || r == '_' || r == '+' || r == ':' || r == '=' || r == ',' ||
			(r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z') || (r >= '0' && r <= '9'))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// writeVerifyCommand prints, under a plan's answer, the command that
// verifies it.
func (f *planFlags) writeVerifyCommand(w io.Writer, p *plan.Plan, pr plan.Promise) {
	switch {
	case p.VMs == plan.Unbounded:
		fmt.Fprintln(w, "verify: nothing to run (the plan is unbounded)")
	case p.VMs == 0 && len(p.Alternatives) > 0:
		a := p.Alternatives[0]
		fmt.Fprintf(w, "verify: nothing to run at this budget; to plan and verify the budget of %s: the same command with -budget %v -verify\n", plan.Dur(a.Budget), a.Budget.Round(time.Microsecond))
	case p.VMs == 0:
		fmt.Fprintln(w, "verify: nothing to run (no VM fits)")
	default:
		fmt.Fprintf(w, "verify: %s\n", f.verifyCommand(pr))
	}
}

// runVerify runs the promised configuration for -verify-duration and
// compares; a broken promise is an error (exit status 1).
func (f *planFlags) runVerify(cfg engine.Config, drv driver, pr plan.Promise, stdout, stderr io.Writer) error {
	sc := &scaler{cfg: cfg, drv: drv, rate: pr.RatePerVM, warm: 100 * time.Millisecond, stderr: stderr, results: map[int]*scaleResult{}, sync: f.sync,
		limit: vmlimit.Config{Rate: f.limits.maxRate, Burst: f.limits.burst}}
	if sc.limit.Rate > 0 {
		sc.rate = min(sc.rate, sc.limit.Rate)
	}
	fmt.Fprintf(stderr, "plan: verifying: %s, for %v\n", drv.describe(pr.VMs), f.vf.duration)
	r, err := sc.measure(pr.VMs, f.vf.duration, false)
	if err != nil {
		return err
	}
	m := plan.Measured{Window: r.window, Events: r.pt.Achieved, P50: r.pt.P50, P99: r.pt.P99, P999: r.pt.P999,
		Callbacks: r.callbacks, OverBudget: r.overBudget, QueuePeak: r.queuePeak, Rejected: r.rejected, Tables: r.tables, Bytes: r.bytes}
	cs := plan.Verify(pr, m)
	if err := plan.WriteVerify(stdout, pr, m, cs); err != nil {
		return err
	}
	if bad := plan.Broken(cs); len(bad) > 0 {
		var why []string
		for _, c := range bad {
			why = append(why, c.Name+": "+c.Why)
		}
		return fmt.Errorf("verify: the run broke the plan's promise: %s", strings.Join(why, "; "))
	}
	return nil
}

// writePrediction prints what the plan predicts at its VMs: the figures
// its verify run is compared with.
func writePrediction(w io.Writer, p *plan.Plan, pr plan.Promise) {
	if p.VMs == 0 || p.VMs == plan.Unbounded {
		return
	}
	fmt.Fprintf(w, "predicted at %d VMs: %s events/s; p50 %s, p99 %s, p99.9 %s (budget %v); queue peak <= %.0f events (%.0f kept); table memory %s, %s per table (%s kept)\n",
		pr.VMs, plan.SI(pr.Events), plan.Dur(pr.P50), plan.Dur(pr.P99), plan.Dur(pr.P999), pr.Budget, pr.QueuePeak, pr.QueueHave,
		plan.Bytes(pr.MemBytes), plan.Bytes(pr.BytesPerTable), plan.Bytes(pr.MemHave))
}

// verifyPromise is `plan -verify -promise ...`: the promise's
// configuration run and compared, nothing planned again.
func (f *planFlags) verifyPromise(cfg engine.Config, vmRateSet bool, stdout, stderr io.Writer) error {
	pr, err := plan.ParsePromise(f.vf.promise)
	if err != nil {
		return usagef("-promise: %v", err)
	}
	pr.Budget = cfg.Budget
	if err := checkVMs("-promise vms=", pr.VMs); err != nil {
		return err
	}
	if pr.VCPUs > maxVCPUs {
		return usagef("-promise vcpus=%d: at most %d", pr.VCPUs, maxVCPUs)
	}
	f.vcpus = pr.VCPUs
	traceVMs := 0
	if f.tracePath != "" {
		w, err := readTraceWorkload(f.tracePath)
		if err != nil {
			return err
		}
		traceVMs = w.VMs
	} else if f.promPath != "" {
		if _, err := readProm(f.promPath, f.promTime, f.promTime != ""); err != nil {
			return err
		}
	}
	offered := pr.RatePerVM
	if vmRateSet && f.tracePath == "" && f.promPath == "" {
		offered = f.vmRate // the workload's rate, over a -vm-max-rate limit
	}
	return f.runVerify(cfg, f.workloadDriver(offered, traceVMs), pr, stdout, stderr)
}
