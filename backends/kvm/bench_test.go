package kvm

import (
	"context"
	"flag"
	"runtime"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/vasmon"
)

var (
	trapRounds = flag.Int("trap.rounds", 9, "BenchmarkTrap: paired rounds, each running every case once")
	trapIters  = flag.Int("trap.iters", 1000, "BenchmarkTrap: guest iterations (two traps each) per case and round")
)

// trapCase is one configuration of BenchmarkTrap.
type trapCase struct {
	name string
	null bool          // apply the write, submit nothing
	zap  int           // shadow-MMU invalidation: syncOff or syncOn
	spin time.Duration // the shard worker's Spin (engine cases)
	busy bool          // a thread spins where the shard worker is pinned
	sync bool          // VMConfig.Sync: each trap submitted synchronously
}

// BenchmarkTrap measures what a trapped page-table write costs the guest,
// on one vCPU running a loop at CPL0 (the guest kernel writes its own
// tables; on kvm_pvm CPL0 code is emulated, see ../shared/reference/HOST.md
// at the root of the shared tree, outside this repository): each iteration
// maps or unmaps a 1 GiB page in a hooked table, so every trap is a
// relevant event with a callback. Six cases, each a fresh VM and engine
// (1 shard) running -trap.iters iterations (two traps each):
//
//   - raw: the write is applied and nothing else (no shadow-MMU zap,
//     nothing submitted): the trap round trip;
//   - zap: raw plus the shadow-MMU invalidation (zapShadows) that shadow
//     paging (kvm_pvm, ept=0, npt=0) needs after every applied write;
//   - poll: the full engine, its worker polling (Spin one hour: it never
//     parks during the run);
//   - park: the full engine, its worker parking after each event (Spin
//     negative), so every Submit wakes it;
//   - busy: the null baseline while a plain thread spins on the CPU the
//     shard worker is pinned to (what a polling worker costs the guest
//     by occupying a core, whatever it does: on kvm_pvm the shadow zap is
//     slower while the other core is busy).
//
// The engine cases zap exactly when the host needs it; the null baseline
// is zap on such a host, raw otherwise. The vCPU thread times every trap
// (from a trapped write's exit to the next one's: the guest's cost of one
// trap) and every Submit. Load from other tenants moves every figure by 2x
// and more between runs, so the cases run in -trap.rounds paired rounds in
// one process (forward order in even rounds, backward in odd ones), and
// each round's engine share is taken against the same round's baseline.
// Metrics:
//
//   - ns/trap-CASE: the median over rounds of each round's median trap;
//     ns/trap-CASE-mean: the same of each round's mean (run time over traps,
//     stalls included);
//   - engine-%-poll, engine-%-park: the engine's added time per trap in
//     percent of the baseline's (per-round medians), median over rounds,
//     with -min and -max over rounds; engine-%-CASE-mean: the median over
//     rounds of the same from the means; busy-%: the same for busy, and
//     engine-%-poll-vs-busy: poll against busy (the polling engine's cost
//     beyond occupying a core);
//   - ns/submit-poll, ns/submit-park and their -p99: the time a Submit
//     takes on the vCPU thread, over every trap of every round;
//     slow-submit-%-CASE: the share of Submits that took over 2 us, and
//     ns/slow-submit-CASE their median: a Submit that finds the worker
//     parked wakes it (a futex wake, microseconds), one that finds it
//     polling only enqueues (a fraction of a microsecond). With Spin
//     negative the worker parks after each event, but a Submit finds it
//     parked only if it got to run and park since the previous one: how
//     often is up to the scheduler, hence the share;
//   - stall-%-raw (-min, -max): the sync case (VMConfig.Sync, the worker
//     parking after each event: the submitter runs the shard's step
//     itself) times each synchronous submission on the vCPU thread, the
//     stall the engine adds to the trap; per round, its median in percent
//     of the same round's median raw trap, median (min, max) over rounds;
//     stall-p99-%-raw the same of each round's p99 stall;
//   - shadow-zap: 1 if the host needs the zap.
//
// The framework's ns/op is suppressed (it would be the whole benchmark's
// time over b.N); b.N is ignored: run it once, with -benchtime 1x.
//
//	go test -run XXX -bench BenchmarkTrap -benchtime 1x ./backends/kvm/ -args -trap.rounds 15 -trap.iters 1000
func BenchmarkTrap(b *testing.B) {
	requireKVM(b)
	iters := uint64(max(*trapIters, 10))
	base := syncOff
	if shadowPaging() {
		base = syncOn
	}
	cases := []trapCase{
		{name: "raw", null: true, zap: syncOff},
		{name: "zap", null: true, zap: syncOn},
		{name: "poll", zap: base, spin: time.Hour},
		{name: "park", zap: base, spin: -1},
		{name: "busy", null: true, zap: base, busy: true},
		{name: "sync", zap: base, spin: -1, sync: true},
	}
	null := 0
	if base == syncOn {
		null = 1
	}
	rounds := max(*trapRounds, 1)
	med := make([][]float64, len(cases))  // per case, per round: median trap
	mean := make([][]float64, len(cases)) // per case, per round: mean trap
	submits := make([][]int64, len(cases))
	stallP50 := make([]float64, 0, rounds) // sync, per round: median stall / median raw trap, %
	stallP99 := make([]float64, 0, rounds) // the same of the p99 stall
	order := make([]int, len(cases))
	for r := 0; r < rounds; r++ {
		for k := range order {
			order[k] = k
		}
		if r%2 == 1 {
			slices.Reverse(order)
		}
		for _, c := range order {
			d, traps, trapNs, sub := runTrapCase(b, cases[c], iters)
			slices.Sort(trapNs)
			med[c] = append(med[c], float64(quantile(trapNs, 0.5)))
			mean[c] = append(mean[c], float64(d.Nanoseconds())/float64(traps))
			submits[c] = append(submits[c], sub...)
			if cases[c].sync {
				slices.Sort(sub)
				stallP50 = append(stallP50, float64(quantile(sub, 0.5)))
				stallP99 = append(stallP99, float64(quantile(sub, 0.99)))
			}
		}
		// The raw case ran in this round too (index 0).
		stallP50[r] = 100 * stallP50[r] / med[0][r]
		stallP99[r] = 100 * stallP99[r] / med[0][r]
	}
	share := func(v [][]float64, c int) []float64 {
		s := make([]float64, rounds)
		for r := range s {
			s[r] = 100 * (v[c][r] - v[null][r]) / v[null][r]
		}
		return s
	}
	b.ReportMetric(0, "ns/op")
	for c, tc := range cases {
		b.ReportMetric(median(med[c]), "ns/trap-"+tc.name)
		b.ReportMetric(median(mean[c]), "ns/trap-"+tc.name+"-mean")
		if tc.busy {
			sh := share(med, c)
			b.ReportMetric(median(sh), "busy-%")
			b.ReportMetric(slices.Min(sh), "busy-%-min")
			b.ReportMetric(slices.Max(sh), "busy-%-max")
			vs := make([]float64, rounds)
			for r := range vs {
				vs[r] = 100 * (med[2][r] - med[c][r]) / med[c][r]
			}
			b.ReportMetric(median(vs), "engine-%-poll-vs-busy")
		}
		if tc.null {
			continue
		}
		sh := share(med, c)
		b.ReportMetric(median(sh), "engine-%-"+tc.name)
		b.ReportMetric(slices.Min(sh), "engine-%-"+tc.name+"-min")
		b.ReportMetric(slices.Max(sh), "engine-%-"+tc.name+"-max")
		b.ReportMetric(median(share(mean, c)), "engine-%-"+tc.name+"-mean")
		sub := submits[c]
		slices.Sort(sub)
		b.ReportMetric(float64(quantile(sub, 0.5)), "ns/submit-"+tc.name)
		b.ReportMetric(float64(quantile(sub, 0.99)), "ns/submit-"+tc.name+"-p99")
		i, _ := slices.BinarySearch(sub, slowSubmit)
		b.ReportMetric(100*float64(len(sub)-i)/float64(max(len(sub), 1)), "slow-submit-%-"+tc.name)
		b.ReportMetric(float64(quantile(sub[i:], 0.5)), "ns/slow-submit-"+tc.name)
	}
	b.ReportMetric(median(stallP50), "stall-%-raw")
	b.ReportMetric(slices.Min(stallP50), "stall-%-raw-min")
	b.ReportMetric(slices.Max(stallP50), "stall-%-raw-max")
	b.ReportMetric(median(stallP99), "stall-p99-%-raw")
	if base == syncOn {
		b.ReportMetric(1, "shadow-zap")
	}
	if testing.Verbose() {
		for c, tc := range cases {
			b.Logf("%-4s per-round median ns/trap %v, mean %v", tc.name, rnd(med[c]), rnd(mean[c]))
		}
	}
}

func rnd(v []float64) []int64 {
	r := make([]int64, len(v))
	for i, x := range v {
		r[i] = int64(x)
	}
	return r
}

// runTrapCase runs the benchmark guest for iters iterations in case c and
// returns the guest's time from the root's start to its end, the traps,
// each trap's time, and (engine cases) each Submit's time.
func runTrapCase(b *testing.B, c trapCase, iters uint64) (time.Duration, uint64, []int64, []int64) {
	// The write-flood policy off: it would unprotect the benchmark's one
	// table page, written at every iteration, and poll it instead.
	e, err := engine.New(engine.Config{Shards: 1, Spin: c.spin, Flood: vasmon.FloodPolicy{Writes: -1}})
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	var calls atomic.Uint64
	req := backends.Request{Monitored: backends.DefaultMonitored,
		Callback: func(any, uint64, uint64, uint64, uint64) { calls.Add(1) }}
	if c.busy {
		defer spinOn(b, e.Config().CPUs[0])()
	}
	var t0 time.Time
	cfg := VMConfig{ID: 1, VCPUs: 1, Iterations: iters, Null: c.null, Sync: c.sync, bench: true, shadowSync: c.zap, timing: true,
		OnStart: func(*vasmon.Root) { t0 = time.Now() }}
	vm, err := NewVM(e, req, cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer vm.Close(context.Background())
	vm.trapNs, vm.submitNs = make([]int64, 0, 2*iters), make([]int64, 0, 2*iters)
	if err := vm.Run(context.Background()); err != nil {
		b.Fatal(err)
	}
	d := time.Since(t0)
	if err := e.Sync(context.Background()); err != nil {
		b.Fatal(err)
	}
	st := vm.Stats()
	if want := 2 * iters; st.Traps != want || uint64(len(vm.trapNs)) != want-1 {
		b.Fatalf("%s: %d traps (%d timed), want %d", c.name, st.Traps, len(vm.trapNs), want)
	}
	if (c.zap == syncOn) != (st.Zaps == st.Traps) || c.zap == syncOff && st.Zaps != 0 {
		b.Fatalf("%s: %d zaps for %d traps", c.name, st.Zaps, st.Traps)
	}
	// An asynchronous engine behind the guest may find a write already
	// undone in its read of the page (a stale write, dropped: no
	// callback); a synchronous one processes each before the next.
	if !c.null && (calls.Load() > st.Traps || c.sync && calls.Load() != st.Traps || uint64(len(vm.submitNs)) != st.Traps) {
		b.Fatalf("%s: %d callbacks and %d timed submits for %d traps", c.name, calls.Load(), len(vm.submitNs), st.Traps)
	}
	if c.sync && (st.SyncWrites != st.Traps || st.Windows != 0) {
		b.Fatalf("%s: %d synchronous writes, %d windows for %d traps", c.name, st.SyncWrites, st.Windows, st.Traps)
	}
	if c.null && (st.Submitted != 0 || calls.Load() != 0 || len(vm.submitNs) != 0) {
		b.Fatalf("%s: the null case submitted %d events, %d callbacks", c.name, st.Submitted, calls.Load())
	}
	return d, st.Traps, vm.trapNs, vm.submitNs
}

// slowSubmit separates a Submit that woke the worker from one that only
// enqueued (BenchmarkTrap).
const slowSubmit = 2000 // ns

// spinOn starts a thread spinning on host CPU cpu; stop ends it.
func spinOn(b *testing.B, cpu int) (stop func()) {
	var quit atomic.Bool
	started, done := make(chan error), make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		var set unix.CPUSet
		set.Set(cpu)
		started <- unix.SchedSetaffinity(0, &set)
		for !quit.Load() {
		}
	}()
	if err := <-started; err != nil {
		b.Fatalf("pinning the spinner to CPU %d: %v", cpu, err)
	}
	return func() { quit.Store(true); <-done }
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// quantile of sorted values (nearest rank).
func quantile(sorted []int64, q float64) int64 {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(q*float64(len(sorted))))]
}
