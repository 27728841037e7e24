package events

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

const (
	p  = vasmon.BitP
	rw = vasmon.BitRW
	us = vasmon.BitUS
	nx = vasmon.BitNX
	ps = vasmon.BitPS
)

func TestClassify(t *testing.T) {
	for _, c := range []struct {
		old, new, size uint64
		kind           Kind
		gained, lost   string
	}{
		{0, 0x1000 | p | us, 4096, KindMap, "+X +U", ""},
		{0x1000 | p | rw | nx, 0, 4096, KindUnmap, "", "-W"},
		{0x1000 | p | rw | us | nx, 0x2000 | p | rw | us | nx, 4096, KindRemap, "", ""},
		{0x1000 | p | rw | us | nx, 0x1000 | p | rw | us, 4096, KindPerm, "+X", ""},
		{0x1000 | p | rw | us, 0x1000 | p | us | nx, 4096, KindPerm, "", "-W -X"},
		{0x1000 | p | us, 0x1000 | p | rw | us | nx, 4096, KindPerm, "+W", "-X"},
		{0x200000 | p | ps | rw, 0x5000 | p | rw, 2 << 20, KindSplit, "", ""},
		{0x5000 | p | rw, 0x200000 | p | ps | rw, 2 << 20, KindMerge, "", ""},
		// The PAT bit (12) of a large page is not part of its frame.
		{0x200000 | p | ps | nx, 0x201000 | p | ps, 2 << 20, KindPerm, "+X", ""},
		{0x1000 | p | 1<<9, 0x1000 | p, 4096, KindOther, "", ""},
	} {
		r := Record{Old: c.old, New: c.new, Size: c.size}
		r.Classify()
		g, l := Changes(r.Gained, 0), Changes(0, r.Lost)
		if r.Kind != c.kind || g != c.gained || l != c.lost {
			t.Errorf("%#x -> %#x: %v %q %q, want %v %q %q", c.old, c.new, r.Kind, g, l, c.kind, c.gained, c.lost)
		}
	}
	if !KernelHalf(vasmon.Mode4, 0xffff800000000000) || KernelHalf(vasmon.Mode4, 0x7fffffffffff) ||
		!KernelHalf(vasmon.Mode32, 0xc0000000) || KernelHalf(vasmon.Mode5, 1<<55) {
		t.Error("KernelHalf")
	}
}

// allRules matches every record with rule 0, and rule 1 when VA is odd.
type allRules struct{ gate chan struct{} }

func (allRules) Names() []string             { return []string{"all", "odd"} }
func (a allRules) NewMatcher(string) Matcher { return a }
func (a allRules) Match(r *Record, _ *RootInfo, hits []uint16) []uint16 {
	if a.gate != nil {
		<-a.gate
	}
	hits = append(hits, 0)
	if r.VA&1 != 0 {
		hits = append(hits, 1)
	}
	return hits
}
func (allRules) Priority(uint16) string { return "info" }
func (allRules) AppendOutput(dst []byte, i uint16, r *Record, root *RootInfo, host string) []byte {
	return fmt.Appendf(dst, "rule %d va %#x root %q on %s", i, r.VA, root.Name, host)
}

// collect is a sink that keeps what it gets; with hold, Write waits on it.
type collect struct {
	mu   sync.Mutex
	got  []Match
	hold chan struct{}
	c    *Counters
}

func (c *collect) Name() string                         { return "collect" }
func (c *collect) Open(_ *Pipeline, cs *Counters) error { c.c = cs; return nil }
func (c *collect) Write(ms []Match) error {
	if c.hold != nil {
		<-c.hold
	}
	c.mu.Lock()
	c.got = append(c.got, ms...)
	c.mu.Unlock()
	return nil
}
func (c *collect) Close(context.Context) error { return nil }

func TestPipelineOrder(t *testing.T) {
	sink := &collect{}
	pl, err := New(Config{Host: "h", Lanes: 2, Ring: 16, Buffer: 8, Rules: allRules{}, Sinks: []Sink{sink}})
	if err != nil {
		t.Fatal(err)
	}
	const vms, per = 5, 20000
	var wg sync.WaitGroup
	for vm := 1; vm <= vms; vm++ {
		cb, ctx := pl.AddRoot(vasmon.VMID(vm), 0x1000, vasmon.Mode4, false, nil,
			&backends.RootInfo{Name: fmt.Sprintf("vm%d/pid 1", vm)})
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range uint64(per) {
				cb(ctx, i<<12, 0, 0x1000|p, 4096)
			}
		}()
	}
	wg.Wait()
	if err := pl.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	next := map[vasmon.VMID]uint64{}
	odd := 0
	for _, m := range sink.got {
		if m.Rule == 1 {
			odd++
			continue
		}
		if want := next[m.VM]; m.VA != want<<12 || m.Seq != want+1 {
			t.Fatalf("VM %d: record %d (seq %d), want %d", m.VM, m.VA>>12, m.Seq, want)
		}
		next[m.VM]++
		if m.Kind != KindMap {
			t.Fatalf("kind %v", m.Kind)
		}
	}
	for vm := 1; vm <= vms; vm++ {
		if next[vasmon.VMID(vm)] != per {
			t.Errorf("VM %d: %d records, want %d", vm, next[vasmon.VMID(vm)], per)
		}
	}
	st := pl.Stats()
	if st.Records != vms*per || st.Matched != vms*per || st.HandoffDrops != 0 || st.Sinks[0].Dropped != 0 ||
		st.Sinks[0].Emitted != vms*per {
		t.Errorf("stats %+v", st)
	}
	if odd != 0 {
		t.Errorf("%d odd matches of even VAs", odd)
	}
}

func TestPipelineDrop(t *testing.T) {
	gate := make(chan struct{})
	sink := &collect{hold: make(chan struct{})}
	pl, err := New(Config{Host: "h", Lanes: 1, Ring: 4, Buffer: 2, OnFull: Drop, Rules: allRules{gate: gate}, Sinks: []Sink{sink}})
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	if err := pl.Register(reg); err != nil {
		t.Fatal(err)
	}
	cb, ctx := pl.AddRoot(1, 0x1000, vasmon.Mode4, false, nil, nil)
	// The lane is held by the rules (gate): the ring takes 4 records, the
	// lane holds up to one batch; the rest are dropped at the handoff.
	const n = 1000
	for i := range uint64(n) {
		cb(ctx, i<<12|1, 0, 0x1000|p, 4096)
	}
	if pl.Stats().HandoffDrops == 0 {
		t.Fatal("no handoff drop with the lane held")
	}
	close(gate)
	// The sink is held: its channel (2) fills, the rest is dropped.
	close(sink.hold)
	if err := pl.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	st := pl.Stats()
	if st.Records+st.HandoffDrops != n {
		t.Errorf("records %d + handoff drops %d != %d", st.Records, st.HandoffDrops, n)
	}
	s := st.Sinks[0]
	if st.Matched != 2*st.Records || s.Emitted+s.Dropped != st.Matched || uint64(len(sink.got)) != s.Emitted {
		t.Errorf("stats %+v, %d got", st, len(sink.got))
	}
	want := float64(st.HandoffDrops)
	if got := testutil.ToFloat64(collectorOf(t, reg, "vasengine_events_dropped_total", "", "handoff")); got != want {
		t.Errorf("dropped_total{handoff} %v, want %v", got, want)
	}
}

// collectorOf returns the one metric of reg named name with the labels'
// values in label-name order, as a collector for testutil.
func collectorOf(t *testing.T, reg *prometheus.Registry, name string, values ...string) prometheus.Collector {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metric:
		for _, m := range mf.GetMetric() {
			for i, l := range m.GetLabel() {
				if i >= len(values) || l.GetValue() != values[i] {
					continue metric
				}
			}
			g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "x"})
			g.Set(m.GetCounter().GetValue() + m.GetGauge().GetValue())
			return g
		}
	}
	t.Fatalf("no %s%v", name, values)
	return nil
}

func TestCallbackAllocs(t *testing.T) {
	pl, err := New(Config{Host: "h", Lanes: 1, Ring: 1 << 16, Rules: allRules{}})
	if err != nil {
		t.Fatal(err)
	}
	defer pl.Close(context.Background())
	cb, ctx := pl.AddRoot(1, 0x1000, vasmon.Mode4, false, func(any, uint64, uint64, uint64, uint64) {}, nil)
	if a := testing.AllocsPerRun(10000, func() { cb(ctx, 0x1000, 0, 0x1000|p, 4096) }); a != 0 {
		t.Errorf("callback: %v allocations", a)
	}
}

func TestJSON(t *testing.T) {
	pl, err := New(Config{Host: "host\"1", Lanes: 1, Rules: allRules{}})
	if err != nil {
		t.Fatal(err)
	}
	defer pl.Close(context.Background())
	_, ctx := pl.AddRoot(3, 0x5000, vasmon.Mode4, true, nil, &backends.RootInfo{Name: "vm3/pid 41 \x01é"})
	rc := ctx.(*rootCtx)
	m := Match{Record: Record{VA: 0xffff800000001000, Old: 0x1000 | p | nx, New: 0x1000 | p | rw, Size: 4096,
		CR3: 0x5000, Seq: 7, Time: 1700000000123456789, VM: 3, Root: rc.idx, Mode: vasmon.Mode4,
		Flags: FlagFullSpace | FlagKernel}, Rule: 1}
	m.Classify()
	line := pl.AppendJSON(nil, &m)
	if line[len(line)-1] != '\n' {
		t.Fatal("no newline")
	}
	var v struct {
		Schema   string `json:"schema"`
		Version  int    `json:"version"`
		ID, Host string
		VM       int
		Seq      int
		Rule     string
		Priority string
		Output   string
		Root     struct {
			CR3, Mode, Name string
			FullSpace       bool `json:"full_space"`
		}
		VA, Old, New string
		Size         int
		Kind         string
		Changes      string
		PermNew      string `json:"perm_new"`
		Kernel       bool
		TimeNs       int64 `json:"time_ns"`
		Time         string
	}
	if err := json.Unmarshal(line, &v); err != nil {
		t.Fatalf("%v: %s", err, line)
	}
	if v.Schema != Schema || v.Version != 1 || v.Host != "host\"1" || v.VM != 3 || v.Seq != 7 || v.Rule != "odd" ||
		v.Root.CR3 != "0x5000" || v.Root.Mode != "4-level" || v.Root.Name != "vm3/pid 41 \x01é" || !v.Root.FullSpace ||
		v.VA != "0xffff800000001000" || v.Kind != "perm" || v.Changes != "+W +X" || v.PermNew != "WX" || !v.Kernel ||
		v.TimeNs != 1700000000123456789 || v.Time != "2023-11-14T22:13:20.123456789Z" ||
		v.ID != "host\"1."+pl.Run()+".3.7.1" || v.Output == "" {
		t.Errorf("%+v\n%s", v, line)
	}
}

// fakeHost captures what Start was given.
type fakeHost struct {
	engine.Host
	cb   vasmon.Callback
	ctx  any
	opts engine.RootOptions
}

func (f *fakeHost) Start(_ context.Context, _ vasmon.VMID, _ uint64, _ vasmon.Mode, _ uint64,
	cb vasmon.Callback, cbctx any, opts engine.RootOptions) (*vasmon.Root, error) {
	f.cb, f.ctx, f.opts = cb, cbctx, opts
	return nil, nil
}

// TestWrap: the wrapped host gives the engine the pipeline's callback; the
// backend's callback or verdict still gets its own context, and both make
// records.
func TestWrap(t *testing.T) {
	sink := &collect{}
	pl, err := New(Config{Host: "h", Lanes: 1, Rules: allRules{}, Sinks: []Sink{sink}})
	if err != nil {
		t.Fatal(err)
	}
	info := &backends.RootInfo{Name: "vm1/pid 7"}
	f := &fakeHost{}
	h := pl.Wrap(f)
	var gotCtx []any
	cb := func(c any, va, old, new, size uint64) { gotCtx = append(gotCtx, c) }
	h.Start(context.Background(), 1, 0x1000, vasmon.Mode4, 0, cb, info, engine.RootOptions{})
	if f.opts.Traced == nil {
		t.Fatal("Wrap's host did not ask the engine for a traced callback")
	}
	f.opts.Traced(f.ctx, 0x1000, 0, 0x1000|p, 4096, 12345) // as the engine calls it
	verdict := func(c any, va, old, new, size uint64) shard.Verdict {
		gotCtx = append(gotCtx, c)
		return shard.Deny
	}
	h.Start(context.Background(), 2, 0x2000, vasmon.Mode4, 0, cb, info, engine.RootOptions{Verdict: verdict,
		Options: vasmon.Options{FullSpace: true}})
	if v := f.opts.Verdict(f.ctx, 0x2000, 0, 0x1000|p, 4096); v != shard.Deny {
		t.Errorf("verdict %v", v)
	}
	if err := pl.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if len(gotCtx) != 2 || gotCtx[0] != info || gotCtx[1] != info {
		t.Errorf("contexts %v", gotCtx)
	}
	if len(sink.got) != 2 || sink.got[0].VM != 1 || sink.got[1].VM != 2 || sink.got[1].Flags&FlagFullSpace == 0 ||
		pl.Root(sink.got[1].Root).Name != "vm1/pid 7" {
		t.Errorf("records %+v", sink.got)
	}
	if len(sink.got) == 2 && (sink.got[0].Trap != shard.UnixNano(12345) || sink.got[1].Trap != 0) {
		t.Errorf("trap times %d and %d, want %d (the traced callback's) and 0 (a verdict has none)",
			sink.got[0].Trap, sink.got[1].Trap, shard.UnixNano(12345))
	}
}
