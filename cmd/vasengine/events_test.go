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

	"github.com/vasengine/vasengine/trace"
	"github.com/vasengine/vasengine/vasmon"
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

// TestEventStreamSummary: with an event output, the JSON summary has the
// pipeline's totals (event_stream), and its sink emitted every line of the
// file; without one, the object is absent.
func TestEventStreamSummary(t *testing.T) {
	out := filepath.Join(t.TempDir(), "events.jsonl")
	const flags = vasmon.BitP | vasmon.BitRW | vasmon.BitUS
	recs := []trace.Record{{Kind: trace.KindVMAdd, VM: 1, RAM: 16 << 20},
		aliasPage(0x1000, 0x2000, 1), aliasPage(0x2000, 0x3000, 1), aliasPage(0x3000, 0x4000, 1),
		{Kind: trace.KindRootStart, VM: 1, CR3: 0x1000, Mode: vasmon.Mode4, Monitored: ^uint64(0)}}
	for i := uint64(0); i < 64; i++ { // executable user pages appear
		recs = append(recs, trace.Record{Kind: trace.KindEvent, VM: 1, GPA: 0x4000 + 8*i, Size: 8, Data: (0x100000 + i<<12) | flags})
	}
	tr := writeTrace(t, recs...)
	code, sum, stderr := replayJSON(t, "-events-out", out, tr)
	if code != 0 || sum.Stream == nil || len(sum.Stream.Sinks) != 1 {
		t.Fatalf("exit %d, event_stream %+v: %s", code, sum.Stream, stderr)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	st, lines := sum.Stream, uint64(strings.Count(string(b), "\n"))
	if st.Records == 0 || st.Matched == 0 || st.Sinks[0].Emitted != lines || st.Sinks[0].Emitted+st.Sinks[0].Dropped != st.Matched {
		t.Fatalf("event_stream %+v (sink %+v), %d lines in the file", st, st.Sinks[0], lines)
	}
	if code, sum, stderr := replayJSON(t, tr); code != 0 || sum.Stream != nil {
		t.Fatalf("no event output: exit %d, event_stream %+v: %s", code, sum.Stream, stderr)
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
