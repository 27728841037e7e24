package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// TestRunSync: run -sync on the simulator submits every event
// synchronously: the -json summary's sync part counts them all (stall
// quantiles ordered, every verdict an allow: the command's callback
// allows), the text summary prints the stall line, and -metrics-out has
// the stall histogram and the verdict counters with the same counts.
func TestRunSync(t *testing.T) {
	path := filepath.Join(t.TempDir(), "metrics.txt")
	code, out, stderr := runMain("run", "-sync", "-json", "-events", "4000", "-duration", "2m", "-vms", "2", "-rate", "0",
		"-metrics-out", path)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var sum summary
	dec := json.NewDecoder(strings.NewReader(out))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&sum); err != nil {
		t.Fatalf("not the schema: %v\n%s", err, out)
	}
	y := sum.Sync
	if y == nil || !sum.Config.Sync {
		t.Fatalf("no sync part, or config.sync unset: %s", out)
	}
	if y.Writes == 0 || y.Writes != sum.Events.Submitted || y.Allowed != y.Writes || y.Denied != 0 ||
		y.P50Ns <= 0 || y.P99Ns < y.P50Ns || y.P999Ns < y.P99Ns || y.MaxNs < y.P999Ns/2 {
		t.Fatalf("sync %+v, %d events submitted", *y, sum.Events.Submitted)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(f)
	if err != nil {
		t.Fatal(err)
	}
	h := fams["vasengine_sync_stall_seconds"]
	if h == nil || len(h.Metric) != 1 || h.Metric[0].GetHistogram().GetSampleCount() != y.Writes {
		t.Fatalf("vasengine_sync_stall_seconds: %v, want %d samples", h, y.Writes)
	}
	v := fams["vasengine_sync_verdicts_total"]
	if v == nil {
		t.Fatal("no vasengine_sync_verdicts_total")
	}
	for _, m := range v.Metric {
		want := y.Allowed
		if m.Label[0].GetValue() == "deny" {
			want = y.Denied
		}
		if got := uint64(m.GetCounter().GetValue()); got != want {
			t.Errorf("verdict %s: %d, summary %d", m.Label[0].GetValue(), got, want)
		}
	}

	// The text summary, and an asynchronous run with no sync line.
	code, out, stderr = runMain("run", "-sync", "-events", "2000", "-duration", "2m", "-vms", "1", "-rate", "0")
	if code != 0 || !strings.Contains(out, "synchronous writes: ") || !strings.Contains(out, "verdicts: ") {
		t.Fatalf("exit %d, no stall line: %s %s", code, out, stderr)
	}
	code, out, stderr = runMain("run", "-events", "2000", "-duration", "2m", "-vms", "1", "-rate", "0")
	if code != 0 || strings.Contains(out, "synchronous writes: ") {
		t.Fatalf("exit %d, asynchronous run with a stall line: %s %s", code, out, stderr)
	}
}

// TestSyncUsage: record -sync is a usage error (the recorder submits
// asynchronously).
func TestSyncUsage(t *testing.T) {
	dir := t.TempDir()
	for _, args := range [][]string{
		{"record", "-sync", "-o", filepath.Join(dir, "t.trace")},
	} {
		if code, _, stderr := runMain(args...); code != 2 || !strings.Contains(stderr, "-sync") {
			t.Errorf("%v: exit %d, %s", args, code, stderr)
		}
	}
}

// TestReplaySyncCLI: replay -sync submits every event of a recorded trace
// synchronously: the summary's synchronous writes are its submitted events.
func TestReplaySyncCLI(t *testing.T) {
	path := filepath.Join(t.TempDir(), "t.trace")
	if code, _, stderr := runMain("record", "-o", path, "-events", "3000", "-vms", "2", "-rate", "0", "-duration", "2m"); code != 0 {
		t.Fatalf("record: exit %d: %s", code, stderr)
	}
	code, out, stderr := runMain("replay", "-sync", "-json", path)
	if code != 0 {
		t.Fatalf("replay: exit %d: %s", code, stderr)
	}
	var sum summary
	if err := json.Unmarshal([]byte(out), &sum); err != nil {
		t.Fatal(err)
	}
	if y := sum.Sync; y == nil || y.Writes == 0 || y.Writes != sum.Events.Submitted || y.Allowed+y.Denied != y.Writes {
		t.Fatalf("sync %+v, events %+v", sum.Sync, sum.Events)
	}
}
