package jsonl

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/events"
	"github.com/vasengine/vasengine/events/rules"
	"github.com/vasengine/vasengine/vasmon"
)

// TestFile runs records through the built-in rules into a file and reads
// every line back as JSON.
func TestFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "events.jsonl")
	s, err := Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	p, err := events.New(events.Config{Host: "h1", Rules: rules.Default(), Sinks: []events.Sink{s}})
	if err != nil {
		t.Fatal(err)
	}
	cb, ctx := p.AddRoot(3, 0x5000, vasmon.Mode4, false, nil, &backends.RootInfo{Name: "vm3/pid 41"})
	const n = 1000
	for i := range uint64(n) {
		// RW data (no rule), then the same page made RWX (W^X and new
		// executable mapping).
		cb(ctx, i<<12, 0, 0x1000|vasmon.BitP|vasmon.BitRW|vasmon.BitUS|vasmon.BitNX, 4096)
		cb(ctx, i<<12, 0x1000|vasmon.BitP|vasmon.BitRW|vasmon.BitUS|vasmon.BitNX, 0x1000|vasmon.BitP|vasmon.BitRW|vasmon.BitUS, 4096)
	}
	if err := p.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	lines := 0
	for sc.Scan() {
		var v struct {
			Schema  string
			Version int
			Rule    string
			Seq     uint64
			VA      string
			Kind    string
			Changes string
			Output  string
			Root    struct{ Name string }
		}
		if err := json.Unmarshal(sc.Bytes(), &v); err != nil {
			t.Fatalf("line %d: %v: %s", lines+1, err, sc.Bytes())
		}
		want := "wx-user-page"
		if lines%2 == 1 {
			want = "new-executable-mapping"
		}
		if v.Schema != "vasengine-event" || v.Version != 1 || v.Rule != want || v.Seq != uint64(lines/2)*2+2 ||
			v.Kind != "perm" || v.Changes != "+X" || v.Root.Name != "vm3/pid 41" || v.Output == "" {
			t.Fatalf("line %d: %+v", lines+1, v)
		}
		lines++
	}
	if lines != 2*n {
		t.Errorf("%d lines, want %d", lines, 2*n)
	}
	st := p.Stats()
	if st.Records != 2*n || st.Matched != 2*n || st.Sinks[0].Emitted != 2*n || st.Sinks[0].Dropped != 0 {
		t.Errorf("stats %+v", st)
	}
}

// failing is a writer that fails.
type failing struct{}

func (failing) Write([]byte) (int, error) { return 0, os.ErrClosed }

func TestWriteError(t *testing.T) {
	p, err := events.New(events.Config{Host: "h1", Rules: rules.Default(), Sinks: []events.Sink{New("bad", failing{})}})
	if err != nil {
		t.Fatal(err)
	}
	cb, ctx := p.AddRoot(3, 0x5000, vasmon.Mode4, false, nil, nil)
	cb(ctx, 0x1000, 0, 0x1000|vasmon.BitP|vasmon.BitRW|vasmon.BitUS, 4096)
	err = p.Close(context.Background())
	if err == nil {
		t.Fatal("no error")
	}
	st := p.Stats()
	// The record's two matches are written in one batch or two, as the
	// sink goroutine happens to find them: one or two failed writes.
	if e := st.Sinks[0].Errors; st.Sinks[0].Dropped != 2 || e < 1 || e > 2 || st.Sinks[0].Emitted != 0 {
		t.Errorf("stats %+v (%v)", st, err)
	}
}
