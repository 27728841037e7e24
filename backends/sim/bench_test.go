package sim_test

import (
	"context"
	"testing"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/sim"
	"github.com/vasengine/vasengine/engine"
)

// BenchmarkSim measures the events per second the simulator produces alone:
// a host that protects every guest page (every page-table store traps) and
// only counts. b.N is the number of events; 4 VMs (one per paging mode), one
// vCPU each.
func BenchmarkSim(b *testing.B) {
	for _, prof := range sim.Profiles() {
		if prof == "idle" {
			continue
		}
		b.Run(prof, func(b *testing.B) {
			benchRun(b, prof, func() (engine.Host, func()) { return newNullHost(true), func() {} })
		})
	}
}

// BenchmarkSimEngine measures the events per second through an engine of
// two shards. Fork- and exit-heavy profiles are bound by the latency of the
// engine's Start and Stop, which block the vCPU.
func BenchmarkSimEngine(b *testing.B) {
	for _, prof := range sim.Profiles() {
		if prof == "idle" {
			continue
		}
		b.Run(prof, func(b *testing.B) {
			benchRun(b, prof, func() (engine.Host, func()) {
				e, err := engine.New(engine.Config{Shards: 2})
				if err != nil {
					b.Fatal(err)
				}
				return e, func() { _ = e.Close() }
			})
		})
	}
}

func benchRun(b *testing.B, prof string, newHost func() (engine.Host, func())) {
	s, err := sim.New(sim.Config{VMs: 4, VCPUs: 1, Profile: prof, Seed: 1, MaxEvents: uint64(max(b.N, 1000))})
	if err != nil {
		b.Fatal(err)
	}
	host, done := newHost()
	defer done()
	b.ResetTimer()
	t0 := time.Now()
	if err := s.Run(context.Background(), host, backends.Request{Monitored: backends.DefaultMonitored}); err != nil {
		b.Fatal(err)
	}
	el := time.Since(t0)
	b.StopTimer()
	st := s.Stats()
	b.ReportMetric(float64(st.TotalTrapped())/el.Seconds(), "events/s")
	b.ReportMetric(float64(st.TotalWrites())/el.Seconds(), "writes/s")
	b.ReportMetric(0, "ns/op")
}
