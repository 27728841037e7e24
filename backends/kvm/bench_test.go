package kvm

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/vasmon"
)

// BenchmarkTrap measures a guest loop of trapped page-table writes at CPL0
// (the guest kernel writes its own tables; on kvm_pvm CPL0 code is
// emulated, see HOST.md) on one vCPU: each iteration maps or unmaps a 1 GiB
// page in a hooked table, so every trap is a relevant event with a
// callback. It runs the loop twice with b.N traps: with a null handler (the
// write is applied, nothing is submitted) and with the full engine, and
// reports ns per trap of each, the engine's added cost per trap in percent
// of the null handler's (engine-%), and the engine run's traps per second
// (traps/s-CPL0). With shadow paging each trap also includes the
// shadow-MMU invalidation (see zapShadows).
func BenchmarkTrap(b *testing.B) {
	requireKVM(b)
	run := func(null bool) (time.Duration, VMStats) {
		e, err := engine.New(engine.Config{Shards: 1})
		if err != nil {
			b.Fatal(err)
		}
		defer e.Close()
		var calls atomic.Uint64
		req := backends.Request{Monitored: backends.DefaultMonitored,
			Callback: func(any, uint64, uint64, uint64, uint64) { calls.Add(1) }}
		var t0 time.Time
		cfg := VMConfig{ID: 1, VCPUs: 1, Iterations: uint64(max(b.N/2, 1)), Null: null, bench: true,
			OnStart: func(*vasmon.Root) { t0 = time.Now() }}
		vm, err := NewVM(e, req, cfg)
		if err != nil {
			b.Fatal(err)
		}
		defer vm.Close(context.Background())
		if err := vm.Run(context.Background()); err != nil {
			b.Fatal(err)
		}
		d := time.Since(t0)
		if err := e.Sync(context.Background()); err != nil {
			b.Fatal(err)
		}
		st := vm.Stats()
		if want := 2 * cfg.Iterations; st.Traps != want {
			b.Fatalf("%d traps, want %d", st.Traps, want)
		}
		if !null && calls.Load() != st.Traps {
			b.Fatalf("%d callbacks for %d traps", calls.Load(), st.Traps)
		}
		return d, st
	}
	b.ResetTimer()
	dn, st := run(true)
	de, _ := run(false)
	n := float64(st.Traps)
	nsNull, nsEng := float64(dn.Nanoseconds())/n, float64(de.Nanoseconds())/n
	b.ReportMetric(nsNull, "ns/trap-null")
	b.ReportMetric(nsEng, "ns/trap-engine")
	b.ReportMetric(100*(nsEng-nsNull)/nsNull, "engine-%")
	b.ReportMetric(n/de.Seconds(), "traps/s-CPL0")
	if st.Zaps > 0 {
		b.ReportMetric(1, "shadow-zap")
	}
}
