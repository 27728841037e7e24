package main

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// TestEventsOut: run -events-out - puts only JSON lines on standard output
// (the summary goes to standard error), one per match the metrics count.
func TestEventsOut(t *testing.T) {
	metrics := filepath.Join(t.TempDir(), "metrics.txt")
	code, stdout, stderr := runMain("run", "-events", "20000", "-duration", "1m", "-vms", "2", "-rate", "0",
		"-events-out", "-", "-metrics-out", metrics)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	sc := bufio.NewScanner(strings.NewReader(stdout))
	sc.Buffer(nil, 1<<20)
	lines := 0
	rules := map[string]int{}
	for sc.Scan() {
		var v struct {
			Schema, Rule, Kind string
			Version, VM        int
		}
		if err := json.Unmarshal(sc.Bytes(), &v); err != nil || v.Schema != "vasengine-event" || v.Version != 1 || v.VM < 1 {
			t.Fatalf("line %d: %v: %s", lines+1, err, sc.Bytes())
		}
		rules[v.Rule]++
		lines++
	}
	if lines == 0 || rules["new-executable-mapping"] == 0 {
		t.Fatalf("no events (%v): %s", rules, stderr)
	}
	if !strings.Contains(stderr, "events/s") || !strings.Contains(stderr, "vasengine: events: ") {
		t.Errorf("no summary or events line on stderr: %s", stderr)
	}
	f, err := os.Open(metrics)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(f)
	if err != nil {
		t.Fatal(err)
	}
	// The metrics file is sampled at the end of the backend's run, before
	// the pipeline has drained: it counts at most the lines written.
	var matched float64
	for _, m := range fams["vasengine_events_matched_total"].GetMetric() {
		matched += m.GetCounter().GetValue()
	}
	if matched > float64(lines) || fams["vasengine_events_dropped_total"] == nil {
		t.Errorf("matched_total %v, %d lines", matched, lines)
	}
}

// TestRulesErrors: a bad rules file is a usage error of one line naming the
// rule and the column.
func TestRulesErrors(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("rules:\n  - name: mine\n    condition: w && nope\n    priority: info\n    output: x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := runMain("run", "-duration", "1s", "-events-out", filepath.Join(dir, "e.jsonl"), "-rules", bad)
	first := strings.SplitN(stderr, "\n", 2)[0]
	if code != 2 || !strings.Contains(first, `rule "mine"`) || !strings.Contains(first, "column 6") {
		t.Errorf("exit %d: %s", code, stderr)
	}
	if code, _, stderr := runMain("run", "-duration", "1s", "-rules", bad); code != 2 || !strings.Contains(stderr, "needs an event output") {
		t.Errorf("-rules alone: exit %d: %s", code, stderr)
	}
	if code, _, stderr := runMain("run", "-duration", "1s", "-events-out", "-", "-on-full", "later"); code != 2 || !strings.Contains(stderr, "-on-full") {
		t.Errorf("-on-full later: exit %d: %s", code, stderr)
	}
}
