package engine_test

import (
	"context"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

func TestMetrics(t *testing.T) {
	e, err := engine.New(engine.Config{Shards: 2, MaxVMLabels: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	reg := prometheus.NewPedanticRegistry()
	if err := e.Register(reg); err != nil {
		t.Fatal(err)
	}
	rec := vasmontest.NewRecorder()
	var vms []*testVM
	for i := 0; i < 4; i++ {
		vms = append(vms, newTestVM(t, vasmon.VMID(i+1), vasmon.Mode4, uint64(i)))
	}
	startVMs(t, e, rec, vms, 1)
	for k := 0; k < 200; k++ {
		v := vms[k%4]
		if _, err := e.Submit(v.id, toEvents(v.w.Next())); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	other := false
	for _, mf := range mfs {
		got[mf.GetName()] = true
		if mf.GetName() == "vasengine_vm_events_submitted_total" {
			if n := len(mf.GetMetric()); n != 3 { // two labelled VMs and "other"
				t.Errorf("vm_events_submitted_total has %d series, want 3", n)
			}
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					other = other || l.GetValue() == "other"
				}
			}
		}
	}
	if !other {
		t.Error("no vm=\"other\" series although 4 VMs exceed MaxVMLabels=2")
	}
	for _, name := range MetricNames {
		if !got[name] {
			t.Errorf("metric %s not exported", name)
		}
	}
	for _, mf := range mfs {
		if mf.GetName() == "vasengine_value_proofs_total" {
			for _, m := range mf.GetMetric() {
				if l := m.GetLabel(); len(l) == 1 && l[0].GetValue() == "stamp" && m.GetCounter().GetValue() == 0 {
					t.Error("value_proofs_total{how=\"stamp\"} is 0 after stamped writes")
				}
			}
		}
		if mf.GetName() == "vasengine_hooked_tables" {
			if v := mf.GetMetric()[0].GetGauge().GetValue(); v <= 0 {
				t.Errorf("hooked_tables = %v", v)
			}
		}
	}
	n, err := testutil.GatherAndCount(reg, "vasengine_events_submitted_total")
	if err != nil || n != 1 {
		t.Fatalf("events_submitted_total: %d series, %v", n, err)
	}
	st := e.Stats()
	if err := testutil.GatherAndCompare(reg, strings.NewReader(
		"# HELP vasengine_events_submitted_total Events passed to Submit.\n# TYPE vasengine_events_submitted_total counter\nvasengine_events_submitted_total "+
			itoa(st.Submitted)+"\n"), "vasengine_events_submitted_total"); err != nil {
		t.Fatal(err)
	}
}

// MetricNames are the series the engine exports (the Grafana dashboard may
// use only these).
var MetricNames = []string{
	"vasengine_events_submitted_total", "vasengine_events_rejected_total", "vasengine_events_total",
	"vasengine_vm_events_total", "vasengine_vm_events_submitted_total", "vasengine_callbacks_total",
	"vasengine_callback_latency_seconds", "vasengine_latency_budget_seconds", "vasengine_latency_budget_violations_total",
	"vasengine_callback_panics_total", "vasengine_queue_depth", "vasengine_queue_capacity", "vasengine_batches_total",
	"vasengine_batch_events_total", "vasengine_hooked_tables", "vasengine_table_host_bytes", "vasengine_hook_refusals_total",
	"vasengine_structural_messages_total", "vasengine_held_requests", "vasengine_partial_writes",
	"vasengine_partial_writes_expired_total", "vasengine_stale_writes_total", "vasengine_value_proofs_total", "vasengine_table_hooks_total", "vasengine_table_unhooks_total", "vasengine_roots", "vasengine_vms", "vasengine_shards",
}

func itoa(v uint64) string {
	var b [20]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + v%10)
		v /= 10
		if v == 0 {
			return string(b[i:])
		}
	}
}

func TestVMLatencyQuantile(t *testing.T) {
	var v engine.VMStats
	if v.LatencyQuantile(0.99) != 0 {
		t.Fatal("empty histogram has a quantile")
	}
	// 90 callbacks at ~1 us (bucket 10: [512, 1024) ns), 10 at ~1 ms.
	v.Latency[10] = 90
	v.Latency[20] = 10
	if q := v.LatencyQuantile(0.5); q != 1024 {
		t.Fatalf("p50 = %v", q)
	}
	if q := v.LatencyQuantile(0.99); q != 1<<20 {
		t.Fatalf("p99 = %v", q)
	}
}
