package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/replay"
	"github.com/vasengine/vasengine/backends/sim"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/plan"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/trace"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vmlimit"
)

// A plan is measured at its own scale (issue 18): the engine's latency
// depends on how many VMs and vCPU threads share the host's CPUs with it,
// not only on the events/s they make, so the cost curve is made of runs of
// the planned workload itself, N VMs x vCPUs at the planned rate per VM,
// for the N the search below settles on; the plan's predictions at its N
// are those of a run at that N. `plan -verify` runs the same measurement
// for longer.

// driver makes the planned workload: n VMs at the planned rate each.
type driver interface {
	// describe says what n VMs of the workload are.
	describe(n int) string
	// vms is the VMs the workload runs for n planned VMs.
	vms(n int) int
	// run drives n VMs into host until ctx ends, calling up once they are
	// all running (their initial roots started).
	run(ctx context.Context, host engine.Host, n int, up func()) error
}

// simDriver runs the simulator: n VMs of a profile at a rate.
type simDriver struct{ cfg sim.Config } // VMs is set per run

func (d *simDriver) describe(n int) string {
	vms := "N simulated VMs"
	if n > 0 {
		vms = fmt.Sprintf("%d simulated VMs", n)
	}
	return fmt.Sprintf("%s x %d vCPUs, profile %s at %s events/s each", vms, d.cfg.VCPUs, d.cfg.Profile, plan.SI(d.cfg.Rate))
}

func (d *simDriver) vms(n int) int { return n }

func (d *simDriver) run(ctx context.Context, host engine.Host, n int, up func()) error {
	cfg := d.cfg
	cfg.VMs = n
	if err := checkMemory(fmt.Sprintf("%d simulated VMs", n), int64(n)*simBytesPerVM); err != nil {
		return err
	}
	s, err := sim.New(cfg)
	if err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, host, backends.Request{Monitored: backends.DefaultMonitored}) }()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if st := s.Stats(); st.RootsStarted+st.StartErrors >= uint64(n*max(cfg.Processes, 1)) {
			up()
			break
		}
		select {
		case err := <-done:
			return err
		case <-tick.C:
		}
	}
	return <-done
}

// traceDriver replays a recorded trace at its recorded pace, as many
// copies at once as make the planned VMs (each copy's VMs under IDs of
// their own), each copy starting over when it reaches the trace's end.
type traceDriver struct {
	path     string
	traceVMs int // VMs in the trace
}

func (d *traceDriver) copies(n int) int {
	return max(1, int(math.Round(float64(n)/float64(d.traceVMs))))
}

func (d *traceDriver) describe(n int) string {
	copies := "copies"
	if n > 0 {
		copies = fmt.Sprintf("%d copies", d.copies(n))
	}
	return fmt.Sprintf("%s of the trace %s (%d VMs each) at its recorded pace, looped", copies, d.path, d.traceVMs)
}

func (d *traceDriver) vms(n int) int { return d.copies(n) * d.traceVMs }

func (d *traceDriver) run(ctx context.Context, host engine.Host, n int, up func()) error {
	copies := d.copies(n)
	var started atomic.Int32
	errs := make(chan error, copies)
	for k := 0; k < copies; k++ {
		go func() {
			first := true
			var err error
			for loop := 0; ctx.Err() == nil && err == nil; loop++ {
				h := &vmOffsetHost{Host: host, off: vasmon.VMID((loop*copies+k+1)%0xffff) << 16}
				if first {
					h.first = func() {
						if int(started.Add(1)) == copies {
							up()
						}
					}
					first = false
				}
				err = d.once(ctx, h)
			}
			if isInterrupt(err) {
				err = nil
			}
			errs <- err
		}()
	}
	var err error
	for k := 0; k < copies; k++ {
		err = errors.Join(err, <-errs)
	}
	return err
}

// once replays the trace into h once, then removes the VMs it left.
func (d *traceDriver) once(ctx context.Context, h *vmOffsetHost) error {
	f, err := os.Open(d.path)
	if err != nil {
		return err
	}
	defer f.Close()
	tr, err := trace.NewReader(bufio.NewReaderSize(f, 1<<20), trace.ReaderOptions{})
	if err != nil {
		return err
	}
	sum, err := replay.RunReader(ctx, h, tr, replay.Options{Speed: replay.Recorded})
	if err == nil {
		err = h.Sync(ctx)
	}
	rctx := context.WithoutCancel(ctx)
	for _, vm := range sum.Live {
		if rerr := h.RemoveVM(rctx, vm.ID); rerr != nil && err == nil {
			err = rerr
		}
	}
	return err
}

// vmOffsetHost passes a replay's calls to the host with its VM IDs moved
// by off, and calls first at its first Submit.
type vmOffsetHost struct {
	engine.Host
	off   vasmon.VMID
	once  sync.Once
	first func()
}

func (h *vmOffsetHost) AddVM(id vasmon.VMID, mem vasmon.Memory, prot vasmon.Protector, maxTables int64) error {
	return h.Host.AddVM(id+h.off, mem, prot, maxTables)
}

func (h *vmOffsetHost) RemoveVM(ctx context.Context, id vasmon.VMID) error {
	return h.Host.RemoveVM(ctx, id+h.off)
}

func (h *vmOffsetHost) Start(ctx context.Context, vm vasmon.VMID, cr3 uint64, mode vasmon.Mode, monitored uint64,
	cb vasmon.Callback, cbctx any, opts engine.RootOptions) (*vasmon.Root, error) {
	return h.Host.Start(ctx, vm+h.off, cr3, mode, monitored, cb, cbctx, opts)
}

func (h *vmOffsetHost) Submit(vm vasmon.VMID, evs []shard.Event) (int, error) {
	if h.first != nil {
		h.once.Do(h.first)
	}
	return h.Host.Submit(vm+h.off, evs)
}

// Sync waits for the engine to be quiescent (the replay uses it).
func (h *vmOffsetHost) Sync(ctx context.Context) error {
	if s, ok := h.Host.(interface{ Sync(context.Context) error }); ok {
		return s.Sync(ctx)
	}
	return nil
}

// scaleResult is one run of the workload at a scale.
type scaleResult struct {
	n, vms        int // planned VMs, VMs run
	pt            plan.Point
	tables, bytes int64 // peak hooked tables (sampled) and their host bytes then: the run summary's accounting
	queuePeak     int
	rejected      uint64
	callbacks     uint64
	overBudget    uint64
	burst         int // most events one VM submitted within 1 ms (0: not metered)
	window        time.Duration
}

// scaler measures the workload at scales.
type scaler struct {
	cfg        engine.Config
	drv        driver
	rate       float64 // events/s per VM
	step, warm time.Duration
	stderr     io.Writer
	results    map[int]*scaleResult
	// limit is the per-VM events/s limit of the planned configuration
	// (-vm-max-rate; Rate 0: none), in front of the engine as in a run.
	limit  vmlimit.Config
	firstN int // the VMs measured first (their bursts metered)
	// memMeasured: the plan's tables per VM and bytes per table are
	// measured (not given by a snapshot or report).
	memMeasured bool
	sync        bool // latencies are synchronous stalls (plan -sync)
}

// bootTimeout bounds how long a measurement waits for its VMs to start.
const bootTimeout = 60 * time.Second

// sampleEvery is how often a measurement samples the queues and tables.
const sampleEvery = 5 * time.Millisecond

// measure runs n VMs of the workload on a fresh engine until they are up,
// lets them warm up, then measures for window: the latency percentiles
// (the difference of the histograms at both ends), events/s processed, the
// peak of queued events and of hooked tables (with their host bytes at
// that peak, as the run summary counts them: sampled) and, with bursts,
// each VM's largest burst.
func (s *scaler) measure(n int, window time.Duration, bursts bool) (*scaleResult, error) {
	res := &scaleResult{n: n, vms: s.drv.vms(n), window: window}
	e, err := engine.New(s.cfg)
	if err != nil {
		return nil, usagef("%v", err)
	}
	defer e.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var front engine.Host = e
	if s.limit.Rate > 0 {
		lc := s.limit
		lc.NonBlocking, lc.Done = s.cfg.NonBlocking, ctx.Done()
		lim, err := vmlimit.New(e, lc)
		if err != nil {
			return nil, usagef("%v", err)
		}
		front = lim
	}
	bh := &burstHost{Host: front}
	host := front
	if bursts {
		host = bh
	}
	upc := make(chan struct{})
	var once sync.Once
	done := make(chan error, 1)
	go func() { done <- s.drv.run(ctx, host, n, func() { once.Do(func() { close(upc) }) }) }()
	label := fmt.Sprintf("%d VMs", res.vms)
	ended := func(err error) error {
		if err == nil {
			err = errors.New("no error")
		}
		return fmt.Errorf("plan: %s: the workload ended early: %w", label, err)
	}
	boot := time.NewTimer(bootTimeout)
	defer boot.Stop()
	select {
	case <-upc:
	case err := <-done:
		return nil, ended(err)
	case <-boot.C:
		return nil, fmt.Errorf("plan: %s: the VMs did not start within %v", label, bootTimeout)
	}
	tick := time.NewTicker(sampleEvery)
	defer tick.Stop()
	var a engine.Stats
	var ta time.Time
	for phase, d := range []time.Duration{s.warm, window} {
		end := time.Now().Add(d)
		for time.Now().Before(end) {
			select {
			case err := <-done:
				return nil, ended(err)
			case <-tick.C:
				if phase == 1 {
					st := e.Stats()
					res.queuePeak = max(res.queuePeak, st.QueueLen)
					if st.Tables > res.tables {
						res.tables, res.bytes = st.Tables, st.HostBytes
					}
				}
			}
		}
		if phase == 0 {
			a, ta = e.Stats(), time.Now()
			bh.on.Store(true)
		}
	}
	b, tb := e.Stats(), time.Now()
	bh.on.Store(false)
	cancel()
	if err := <-done; err != nil && !isInterrupt(err) {
		return nil, fmt.Errorf("plan: %s: %w", label, err)
	}
	if b.Tables > res.tables {
		res.tables, res.bytes = b.Tables, b.HostBytes
	}
	res.queuePeak = max(res.queuePeak, b.QueueLen)
	h := latencyOf(&a, &b, s.sync)
	processed := b.Processed - a.Processed
	if processed == 0 {
		return nil, fmt.Errorf("plan: %s: no event processed in %v", label, window)
	}
	res.window = tb.Sub(ta)
	res.rejected = b.Rejected - a.Rejected
	res.callbacks, res.overBudget = b.Callbacks-a.Callbacks, b.OverBudget-a.OverBudget
	res.pt = plan.Point{Label: label, Offered: s.rate * float64(res.vms), Achieved: float64(processed) / res.window.Seconds(),
		P50: time.Duration(h.Quantile(0.5)), P99: time.Duration(h.Quantile(0.99)), P999: time.Duration(h.Quantile(0.999))}
	res.pt.Saturated = res.pt.Achieved < plan.SaturationRatio*res.pt.Offered
	res.burst = bh.max()
	return res, nil
}

// at measures n for window, unless it was measured for as long already.
func (s *scaler) at(n int, bursts bool, window time.Duration) (*scaleResult, error) {
	if r := s.results[n]; r != nil && r.window >= window*9/10 {
		return r, nil
	}
	r, err := s.measure(n, window, bursts)
	if err != nil {
		return nil, err
	}
	s.results[n] = r
	fmt.Fprintf(s.stderr, "plan: %-8s %10s events/s  p99 %-12v %5d tables  (%v)\n", r.pt.Label, plan.SI(r.pt.Achieved), r.pt.P99, r.tables, window)
	return r, nil
}

// curve is the measurements as a cost curve.
func (s *scaler) curve() []plan.Point {
	ns := make([]int, 0, len(s.results))
	for n := range s.results {
		ns = append(ns, n)
	}
	sort.Ints(ns)
	pts := make([]plan.Point, len(ns))
	for i, n := range ns {
		pts[i] = s.results[n].pt
	}
	return pts
}

// search measures the workload at the scales the plan needs: from first
// (measured already), up (doubling) or down (halving) until the budget is
// crossed, then bisecting the crossing, then at the planned VMs for final
// (the verify run's length); it re-plans after each measurement and stops
// when the planned VMs were measured that long and the plan no longer
// changes, or after maxRuns measurements. compute plans from the
// measurements so far. limit is the most VMs worth measuring.
func (s *scaler) search(first, limit, maxRuns int, budget, final time.Duration, compute func() (*plan.Plan, error)) (*plan.Plan, error) {
	within := func(r *scaleResult) bool { return !r.pt.Saturated && r.pt.P99 <= budget }
	n, window := first, s.step
	var p *plan.Plan
	for run := 0; ; run++ {
		if run > 0 {
			if _, err := s.at(n, false, window); err != nil {
				return nil, err
			}
		}
		var err error
		if p, err = compute(); err != nil {
			return nil, err
		}
		if run+1 >= maxRuns {
			return p, nil
		}
		lo, hi := 0, 0 // the most VMs measured within the budget, the fewest over it
		top := 0
		for m, r := range s.results {
			top = max(top, m)
			if within(r) {
				lo = max(lo, m)
			} else if hi == 0 || m < hi {
				hi = m
			}
		}
		planned := p.VMs
		next := 0
		window = s.step
		switch {
		case hi == 0 && lo < limit:
			next = min(limit, 2*lo)
		case lo == 0 && hi > 1:
			next = max(1, hi/2)
		case lo == 0:
			// No VM fits: measure heavier loads, for the budgets that
			// would fit some.
			next = min(limit, 4*top)
		case hi > lo+max(1, lo/8):
			next = (lo + hi) / 2
		}
		// The last run is for the planned VMs, if they were not measured
		// as long as the verify run.
		if r := s.results[planned]; planned > 0 && planned < plan.Unbounded && (r == nil || r.window < final*9/10) && (next == 0 || run+2 >= maxRuns) {
			next, window = planned, final
		}
		if next == 0 || (s.results[next] != nil && window == s.step) {
			return p, nil
		}
		n = next
	}
}
