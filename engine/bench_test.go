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
	for _, shards := range []int{1, 2} {
		b.Run(fmt.Sprintf("shards=%d", shards), func(b *testing.B) {
			e, err := engine.New(engine.Config{Shards: shards})
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
