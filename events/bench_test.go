package events_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/vasengine/vasengine/bench"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/events"
	"github.com/vasengine/vasengine/events/jsonl"
	"github.com/vasengine/vasengine/events/rules"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

var (
	wlOnce sync.Once
	wl     *bench.Workload
)

// BenchmarkEnginePipeline is the engine's throughput (engine.BenchmarkEngine's
// workload, 2 shards) with the event pipeline off and on: every callback a
// record, every record matched by one rule and encoded as a JSON line into
// a discarding sink, -on-full block (nothing dropped: the engine is held
// back when the pipeline cannot keep up). Compare with benchstat:
//
//	go test -run XXX -bench EnginePipeline -count 10 ./events/ | benchstat -col /pipeline -
func BenchmarkEnginePipeline(b *testing.B) {
	wlOnce.Do(func() { wl = bench.NewWorkload(4, 128, 7) })
	for _, on := range []bool{false, true} {
		name := "pipeline=off"
		if on {
			name = "pipeline=on"
		}
		b.Run(name, func(b *testing.B) {
			e, err := engine.New(engine.Config{Shards: 2})
			if err != nil {
				b.Fatal(err)
			}
			defer e.Close()
			var host engine.Host = e
			var p *events.Pipeline
			if on {
				set, err := rules.Parse("all.yaml", []byte("defaults: false\nrules:\n  - {name: all, condition: 'true', priority: info, output: '%kind %va in %root'}\n"))
				if err != nil {
					b.Fatal(err)
				}
				if p, err = events.New(events.Config{Host: "h1", Rules: set, Sinks: []events.Sink{jsonl.Discard()}}); err != nil {
					b.Fatal(err)
				}
				host = p.Wrap(e)
			}
			for i, g := range wl.Guests {
				if err := e.AddVM(vasmon.VMID(i+1), g.Memory(), g.NewProtections(), 0); err != nil {
					b.Fatal(err)
				}
				if _, err := host.Start(context.Background(), vasmon.VMID(i+1), wl.Roots[i], vasmon.Mode4, bench.Monitored, bench.Nop, nil, engine.RootOptions{}); err != nil {
					b.Fatal(err)
				}
			}
			submit := func(vm vasmon.VMID, evs []shard.Event) { e.Submit(vm, evs) }
			bench.WaitProcessed(e, uint64(wl.Drive(submit, 1<<18, 256)))
			base := e.Stats()
			var records0 uint64
			if p != nil {
				records0 = p.Stats().Records
			}
			b.ResetTimer()
			start := time.Now()
			n := wl.Drive(submit, b.N, 256)
			bench.WaitProcessed(e, base.Processed+uint64(n))
			el := time.Since(start)
			b.StopTimer()
			b.ReportMetric(float64(n)/el.Seconds(), "events/s")
			if p != nil {
				e.Close()
				if err := p.Close(context.Background()); err != nil {
					b.Fatal(err)
				}
				st := p.Stats()
				if st.HandoffDrops != 0 || st.Sinks[0].Dropped != 0 {
					b.Fatalf("drops: %+v", st)
				}
				b.ReportMetric(float64(st.Records-records0)/el.Seconds(), "records/s")
			}
		})
	}
}
