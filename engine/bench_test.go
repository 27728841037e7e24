package engine_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/vasengine/vasengine/bench"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

var (
	benchOnce sync.Once
	benchWL   *bench.Workload
)

func benchWorkload() *bench.Workload {
	benchOnce.Do(func() { benchWL = bench.NewWorkload(4, 128, 7) })
	return benchWL
}

func submitTo(e *engine.Engine) bench.Submitter {
	return func(vm vasmon.VMID, evs []shard.Event) { e.Submit(vm, evs) }
}

// BenchmarkEngine: events/s through the sharded engine with producers on
// other goroutines (one per VM), p99 trap-to-callback latency under this
// saturating closed-loop load, and allocations per event.
func BenchmarkEngine(b *testing.B) {
	w := benchWorkload()
	for _, c := range []struct {
		shards int
		pin    bool
	}{{1, false}, {2, false}, {1, true}, {2, true}} {
		name := fmt.Sprintf("shards=%d", c.shards)
		if c.pin {
			name += "/pinned"
		}
		b.Run(name, func(b *testing.B) {
			e, err := engine.New(engine.Config{Shards: c.shards, Pin: c.pin})
			if err != nil {
				b.Fatal(err)
			}
			defer e.Close()
			if err := w.Start(e, bench.Nop); err != nil {
				b.Fatal(err)
			}
			// Warm up: every table hooked, arenas and queues at size.
			bench.WaitProcessed(e, uint64(w.Drive(submitTo(e), 1<<18, 256)))
			base := e.Stats()
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			n := w.Drive(submitTo(e), b.N, 256)
			bench.WaitProcessed(e, base.Processed+uint64(n))
			el := time.Since(start)
			b.StopTimer()
			st := e.Stats()
			st.Latency.Sub(&base.Latency)
			b.ReportMetric(float64(n)/el.Seconds(), "events/s")
			b.ReportMetric(float64(st.Latency.Quantile(0.99)), "p99-ns")
			if p := st.Proofs + st.StampProofs; p > 0 {
				b.ReportMetric(float64(st.StampProofs)/float64(p), "stamp-proofs/proof")
			}
		})
	}
}

// BenchmarkNaiveEngine runs BenchmarkEngine's workload through the naive
// engine a newcomer would write (bench.Naive).
func BenchmarkNaiveEngine(b *testing.B) {
	w := benchWorkload()
	n := bench.NewNaive(w, bench.Nop)
	defer n.Close()
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	total := w.Drive(n.Submit, b.N, 256)
	n.Wait(uint64(total))
	b.ReportMetric(float64(total)/time.Since(start).Seconds(), "events/s")
}

// BenchmarkMemoryLimit is the physical floor of the workload: one random
// read-modify-write per event into a working set as large as the shadows
// of the workload's tables, on as many goroutines as there are CPUs.
func BenchmarkMemoryLimit(b *testing.B) {
	w := benchWorkload()
	b.ResetTimer()
	b.ReportMetric(w.MemoryFloor(b.N), "events/s")
}

// TestEngineSteadyStateAllocs: submitting and processing batches of leaf
// writes (with callbacks) allocates nothing once warmed up.
func TestEngineSteadyStateAllocs(t *testing.T) {
	w := bench.NewWorkload(2, 8, 3)
	e, err := engine.New(engine.Config{Shards: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := w.Start(e, bench.Nop); err != nil {
		t.Fatal(err)
	}
	var done uint64
	buf := make([]shard.Event, 256)
	run := func() {
		for v, evs := range w.Events {
			for at := 0; at < len(evs); at += 256 {
				b := buf[:min(256, len(evs)-at)]
				w.Store(v, b, evs[at:at+len(b)])
				if _, err := e.Submit(vasmon.VMID(v+1), b); err != nil {
					t.Fatal(err)
				}
				done += uint64(min(256, len(evs)-at))
			}
		}
		bench.WaitProcessed(e, done)
	}
	run()
	run()
	if a := testing.AllocsPerRun(5, run); a != 0 {
		t.Fatalf("%v allocations per run of %d events", a, done/7)
	}
	if e.Stats().Callbacks == 0 {
		t.Fatal("workload produced no callbacks")
	}
}

// BenchmarkSyncStall: the stall a synchronous write (Syncer.Submit) adds to
// its writer, from the trap to the return, for 1 to 64 writers spread over
// up to 8 VMs (each writer owns its entries), with leaf-only writes (one
// callback each) and hook-heavy ones (each links or unlinks a table of 8
// mappings), over 1, 2 and 4 shards. The async sub-benchmarks are the same
// workloads submitted asynchronously, in the same run.
func BenchmarkSyncStall(b *testing.B) {
	mixes := []struct {
		name string
		w    func(vms int) *bench.Workload
	}{
		{"leaf", func(vms int) *bench.Workload { return bench.NewWorkload(vms, 16, 5) }},
		{"hook", func(vms int) *bench.Workload { return bench.NewHookWorkload(vms, 256, 5) }},
	}
	for _, mix := range mixes {
		for _, shards := range []int{1, 2, 4} {
			for _, writers := range []int{1, 4, 16, 64} {
				b.Run(fmt.Sprintf("%s/shards=%d/writers=%d", mix.name, shards, writers), func(b *testing.B) {
					syncStall(b, mix.w(min(writers, 8)), shards, writers)
				})
			}
			b.Run(fmt.Sprintf("%s/shards=%d/async", mix.name, shards), func(b *testing.B) {
				w := mix.w(4)
				e, err := engine.New(engine.Config{Shards: shards})
				if err != nil {
					b.Fatal(err)
				}
				defer e.Close()
				if err := w.Start(e, bench.Nop); err != nil {
					b.Fatal(err)
				}
				bench.WaitProcessed(e, uint64(w.Drive(submitTo(e), 1<<16, 64)))
				base := e.Stats().Processed
				b.ReportAllocs()
				b.ResetTimer()
				start := time.Now()
				n := w.Drive(submitTo(e), b.N, 64)
				bench.WaitProcessed(e, base+uint64(n))
				b.ReportMetric(float64(n)/time.Since(start).Seconds(), "events/s")
			})
		}
	}
}

func syncStall(b *testing.B, w *bench.Workload, shards, writers int) {
	e, err := engine.New(engine.Config{Shards: shards})
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	if err := w.Start(e, bench.Nop); err != nil {
		b.Fatal(err)
	}
	vms := len(w.Events)
	perVM := (writers + vms - 1) / vms
	// Writer k writes VM k%vms's entries whose index is k/vms mod perVM.
	type writer struct {
		v   int
		evs []shard.Event
		s   *engine.Syncer
	}
	ws := make([]*writer, writers)
	for k := range ws {
		v := k % vms
		wr := &writer{v: v}
		for _, ev := range w.Events[v] {
			if int(ev.GPA/8)%perVM == k/vms%perVM {
				wr.evs = append(wr.evs, ev)
			}
		}
		s, err := e.NewSyncer(vasmon.VMID(v + 1))
		if err != nil {
			b.Fatal(err)
		}
		wr.s = s
		ws[k] = wr
	}
	run := func(total int) {
		var wg sync.WaitGroup
		var mu sync.Mutex // writers sharing a VM's guest memory store one at a time
		for _, wr := range ws {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var one [1]shard.Event
				for i := 0; i < total/writers; i++ {
					mu.Lock()
					w.Store(wr.v, one[:], wr.evs[i%len(wr.evs):i%len(wr.evs)+1])
					mu.Unlock()
					one[0].Trap = shard.Now()
					if _, err := wr.s.Submit(one[:]); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
	}
	run(4096)
	base := e.Stats()
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	run(b.N)
	el := time.Since(start)
	b.StopTimer()
	st := e.Stats()
	st.SyncStall.Sub(&base.SyncStall)
	b.ReportMetric(float64(st.SyncStall.Count())/el.Seconds(), "writes/s")
	b.ReportMetric(float64(st.SyncStall.Quantile(0.5)), "stall-p50-ns")
	b.ReportMetric(float64(st.SyncStall.Quantile(0.99)), "stall-p99-ns")
	b.ReportMetric(float64(st.SyncStall.Quantile(0.999)), "stall-p999-ns")
	for _, wr := range ws {
		wr.s.Close()
	}
}
