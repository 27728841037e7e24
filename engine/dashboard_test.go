package engine_test

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// TestDashboardQueries: every query of the Grafana dashboard names only
// metrics the engine exports (histogram series by their _bucket, _sum and
// _count names).
func TestDashboardQueries(t *testing.T) {
	raw, err := os.ReadFile("../dashboards/vasengine.json")
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatal(err)
	}
	e, err := engine.New(engine.Config{Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	// A VM, so that the per-VM families have series.
	g := vasmontest.NewGuest(vasmon.Mode4, 1<<20, 0)
	if err := e.AddVM(1, g.Mem, vasmontest.NewProtections(), 0); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	if err := e.Register(reg); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	exported := map[string]bool{}
	for _, mf := range mfs {
		n := mf.GetName()
		exported[n] = true
		if mf.GetType().String() == "HISTOGRAM" {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				exported[n+s] = true
			}
		}
	}
	name := regexp.MustCompile(`\bvasengine_[a-z_]+`)
	queries, used := 0, map[string]bool{}
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			queries++
			for _, m := range name.FindAllString(tg.Expr, -1) {
				if !exported[m] {
					t.Errorf("panel %q queries %s, which the engine does not export", p.Title, m)
				}
				used[strings.TrimSuffix(m, "_bucket")] = true
			}
		}
	}
	if queries < 10 {
		t.Fatalf("dashboard has %d queries", queries)
	}
	for _, must := range []string{"vasengine_callback_latency_seconds", "vasengine_latency_budget_seconds", "vasengine_queue_depth",
		"vasengine_hooked_tables", "vasengine_table_host_bytes", "vasengine_events_total"} {
		if !used[must] {
			t.Errorf("dashboard does not show %s", must)
		}
	}
}
