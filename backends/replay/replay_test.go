package replay_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/replay"
	"github.com/vasengine/vasengine/backends/sim"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/guestmem"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/trace"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

const monitored = backends.DefaultMonitored

type rootKey struct {
	vm  vasmon.VMID
	cr3 uint64
}

func keyOf(ctx any) rootKey {
	switch k := ctx.(type) {
	case rootKey:
		return k
	case *backends.RootInfo:
		return rootKey{k.VM, k.CR3}
	}
	panic(fmt.Sprintf("callback context %T", ctx))
}

func toEvents(ws []vasmon.Write) []shard.Event {
	evs := make([]shard.Event, len(ws))
	for i, w := range ws {
		evs[i] = shard.Event{GPA: w.GPA, Data: w.Data, Old: w.Old, RIP: w.RIP, Size: w.Size, HasOld: w.HasOld, Trap: shard.Now()}
	}
	return evs
}

// original is a recorded run: guests driven by random writers through a
// Recorder wrapping a real engine.
type original struct {
	vms    []*guestVM
	starts map[rootKey]vasmontest.Map // walks when each root started
	params map[rootKey]vasmontest.WalkParams
	live   map[rootKey]bool // roots still monitored at the end
	cbs    *vasmontest.Recorder
	events uint64
}

type guestVM struct {
	id vasmon.VMID
	g  *vasmontest.Guest
	w  *vasmontest.RandomWriter
}

func (v *guestVM) cr3(r int) uint64 {
	if v.g.Mode == vasmon.ModePAE {
		return v.w.Tables[r] + uint64(32*r)
	}
	return v.w.Tables[r]
}

// record runs the original: 4 VMs (one per paging mode), 2 roots each, then
// a third root started while the writers run; then it stops one root and
// removes one VM, and closes the trace.
//
// In lockstep, each Submit is followed by a Sync of the engine, so no event
// races a hook.
func record(t *testing.T, path string, steps int, seed uint64, lockstep bool) *original {
	t.Helper()
	e, err := engine.New(engine.Config{Shards: 2, QueueDepth: 512})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rec := trace.NewRecorder(f, e)
	o := &original{starts: map[rootKey]vasmontest.Map{}, params: map[rootKey]vasmontest.WalkParams{},
		live: map[rootKey]bool{}, cbs: vasmontest.NewRecorder()}
	ctx := context.Background()
	var mu sync.Mutex // guards o's maps against the late starts
	start := func(v *guestVM, r int) {
		k := rootKey{v.id, v.cr3(r)}
		root, err := rec.Start(ctx, v.id, k.cr3, v.g.Mode, monitored, o.cbs.Callback, k, engine.RootOptions{})
		if err != nil {
			t.Error(err)
			return
		}
		m, err := vasmontest.WalkRoot(v.g.Mem, root)
		if err != nil {
			t.Error(err)
		}
		mu.Lock()
		o.starts[k], o.params[k], o.live[k] = m, vasmontest.ParamsOf(root), true
		mu.Unlock()
	}
	for i, mode := range vasmon.Modes {
		g := vasmontest.NewGuest(mode, 64<<20, 1<<20)
		v := &guestVM{id: vasmon.VMID(i + 1), g: g, w: vasmontest.NewRandomWriter(g, seed+uint64(i), 12)}
		// In lockstep the replay syncs after each event, and Sync waits
		// for split entry writes to complete or expire: no split writes.
		v.w.NoSplit = lockstep
		for k := 0; k < 10; k++ {
			v.w.Next() // before monitoring: in memory only
		}
		if err := rec.AddVM(v.id, g.Mem, vasmontest.NewProtections(), 0); err != nil {
			t.Fatal(err)
		}
		start(v, 0)
		start(v, 1)
		o.vms = append(o.vms, v)
	}
	var wg sync.WaitGroup
	var one sync.Mutex // lockstep: one producer at a time
	for _, v := range o.vms {
		wg.Add(1)
		go func() {
			if lockstep {
				one.Lock()
				defer one.Unlock()
			}
			defer wg.Done()
			for k := 0; k < steps; k++ {
				if k == steps/2 {
					// The writer's own stores pause meanwhile. Its events
					// must be processed first: the engine builds a new root
					// from the copies of pages hooked for the other roots
					// without applying the events queued for them (see the
					// barrier in backends/sim/sim_test.go).
					if err := e.Sync(ctx); err != nil {
						t.Error(err)
					}
					start(v, 2)
				}
				evs := toEvents(v.w.Next())
				if _, err := rec.Submit(v.id, evs); err != nil {
					t.Error(err)
					return
				}
				if lockstep {
					if err := e.Sync(ctx); err != nil {
						t.Error(err)
					}
				}
				mu.Lock()
				o.events += uint64(len(evs))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if err := e.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	// The original satisfies the oracle.
	for k, m := range o.starts {
		m = m.Clone()
		vasmontest.Apply(m, o.params[k].Mode, monitored, o.cbs.Peek(k))
		want, _ := vasmontest.Walk(o.vm(k.vm).g.Mem, o.params[k])
		if d := vasmontest.Diff(want, m, 5); d != "" {
			t.Fatalf("original root %v: %s", k, d)
		}
	}
	v := o.vms[0]
	k := rootKey{v.id, v.cr3(0)}
	if err := rec.Stop(ctx, e.Root(k.vm, k.cr3)); err != nil {
		t.Fatal(err)
	}
	o.live[k] = false
	if err := rec.RemoveVM(ctx, o.vms[1].id); err != nil {
		t.Fatal(err)
	}
	for r := 0; r < 3; r++ {
		o.live[rootKey{o.vms[1].id, o.vms[1].cr3(r)}] = false
	}
	if err := e.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if err := rec.Close(); err != nil {
		t.Fatal(err)
	}
	return o
}

func (o *original) vm(id vasmon.VMID) *guestVM { return o.vms[id-1] }

// replayed is a replay of a trace into a fresh engine.
type replayed struct {
	e      *engine.Engine
	sum    *replay.Summary
	cbs    *vasmontest.Recorder
	starts map[rootKey]vasmontest.Map
	roots  map[rootKey]*vasmon.Root
}

// syncHost makes every Submit wait until the engine is quiescent.
type syncHost struct{ *engine.Engine }

func (h syncHost) Submit(vm vasmon.VMID, evs []shard.Event) (int, error) {
	n, err := h.Engine.Submit(vm, evs)
	if serr := h.Sync(context.Background()); err == nil {
		err = serr
	}
	return n, err
}

// replayFile replays a trace file into a fresh engine; in lockstep, one
// event at a time, each processed before the next is applied to memory.
func replayFile(t *testing.T, path string, opts replay.Options, lockstep bool) (*replayed, error) {
	return replayInto(t, engine.Config{Shards: 2, QueueDepth: 512}, path, opts, lockstep)
}

func replayInto(t *testing.T, cfg engine.Config, path string, opts replay.Options, lockstep bool) (*replayed, error) {
	t.Helper()
	e, err := engine.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := &replayed{e: e, cbs: vasmontest.NewRecorder(), starts: map[rootKey]vasmontest.Map{},
		roots: map[rootKey]*vasmon.Root{}}
	if opts.Request.Monitored == 0 {
		opts.Request.Monitored = monitored
	}
	opts.Request.Callback = p.cbs.Callback
	opts.OnStart = func(r *vasmon.Root, mem *guestmem.Memory) {
		m, err := vasmontest.WalkRoot(mem, r)
		if err != nil {
			t.Error(err)
		}
		k := keyOf(r.Ctx)
		p.starts[k], p.roots[k] = m, r
	}
	var host engine.Host = e
	if lockstep {
		host, opts.Batch = syncHost{e}, 1
	}
	p.sum, err = replay.Run(context.Background(), host, f, opts)
	if serr := e.Sync(context.Background()); serr != nil {
		t.Fatal(serr)
	}
	return p, err
}

// checkOracle checks every replayed root: its callbacks turn its walk at
// start into the walk of the replayed memory now (nothing, if stopped).
func (p *replayed) checkOracle(t *testing.T) {
	t.Helper()
	for k, m := range p.starts {
		r := p.roots[k]
		want := vasmontest.Map{}
		if !r.Stopped() {
			var err error
			if want, err = vasmontest.Walk(p.sum.Live[k.vm].Mem, vasmontest.ParamsOf(r)); err != nil {
				t.Fatal(err)
			}
		}
		m = m.Clone()
		vasmontest.Apply(m, r.Mode, r.Monitored, p.cbs.Peek(r.Ctx))
		if d := vasmontest.Diff(want, m, 5); d != "" {
			t.Fatalf("replayed root %v (stopped %v): oracle violated: %s", k, r.Stopped(), d)
		}
	}
}

// multiset returns callbacks as sorted strings.
func multiset(evs []vasmontest.Event) []string {
	s := make([]string, len(evs))
	for i, e := range evs {
		s[i] = e.String()
	}
	slices.Sort(s)
	return s
}

// diffCount returns how many callbacks are in one multiset and not the other.
func diffCount(a, b []string) int {
	n, i, j := 0, 0, 0
	for i < len(a) || j < len(b) {
		switch {
		case j == len(b) || i < len(a) && a[i] < b[j]:
			n, i = n+1, i+1
		case i == len(a) || b[j] < a[i]:
			n, j = n+1, j+1
		default:
			i, j = i+1, j+1
		}
	}
	return n
}

// TestRecordReplayOracle records a run of a real engine (2 shards, 4 VMs
// in the four paging modes, random writers, roots started before and during
// the writes, one root stopped and one VM removed at the end) and replays it
// into a fresh engine. Every replayed root satisfies the oracle against the
// replayed memory; it starts from the tree the original started from and
// ends with the tree the original ended with; every table hooked at the end
// holds the same bytes in both memories. In lockstep (nothing races a
// hook), every root's callback multiset equals the original's; free-running,
// it need not (see compare).
func TestRecordReplayOracle(t *testing.T) {
	steps := 1500
	if testing.Short() {
		steps = 600
	}
	type run struct {
		seed     uint64
		lockstep bool
		steps    int
	}
	// Lockstep costs a Sync (about a millisecond) per event on both sides.
	for _, c := range []run{{1, false, steps}, {2, false, steps}, {3, false, steps}, {4, true, steps / 8}} {
		t.Run(fmt.Sprintf("seed=%d/lockstep=%v", c.seed, c.lockstep), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "run.trace")
			o := record(t, path, c.steps, c.seed*1000, c.lockstep)
			p, err := replayFile(t, path, replay.Options{}, c.lockstep)
			if err != nil {
				t.Fatal(err)
			}
			s := p.sum
			t.Logf("replayed %d records (%d bytes): %d events, %d pages, %d synthetic events, %d VMs, %d roots, %d skipped",
				s.Records, s.Bytes, s.Events, s.Pages, s.Synthetic, s.VMs, s.Roots, s.Skipped)
			if s.Events != int64(o.events) || s.VMs != 4 || s.Roots != 12 || s.Skipped != 0 || s.Damage != nil {
				t.Fatalf("summary %+v; the original submitted %d events", s, o.events)
			}
			if st := p.e.Stats(); st.Submitted != uint64(s.Events+s.Synthetic) || st.Rejected != 0 {
				t.Fatalf("replay engine: submitted %d rejected %d", st.Submitted, st.Rejected)
			}
			p.checkOracle(t)
			compare(t, o, p, c.lockstep)
		})
	}
}

// compare checks the replay against the original: each root's walk at
// start and at the end, the bytes of the tables hooked at the end, and the
// callbacks (equal as multisets if exact).
//
// Free-running, the callback multisets of most roots differ (the oracle
// holds for both) because hooks are asynchronous: an engine reads a table
// linked by an event when the owning shard executes the hook, and by then
// memory may hold stores whose events come later. In the original the
// producers run ahead freely; in the replay memory runs ahead by the events
// of the batch being built (up to 256, written before they are submitted),
// and a table hooked before the reader reaches its Page record is read
// stale and brought up to date by the made-up events of that record. So a
// mapping stored shortly after its table was linked is reported, in one run,
// as found by the hook (0 -> v), and in the other as found by the hook with
// its previous value and then changed by the event (0 -> u, u -> v); an
// entry removed meanwhile is reported in one run and not the other. Both
// streams turn the walk at start into the walk at the end. In lockstep
// (the original syncs the engine after each Submit, without split entry
// writes since Sync waits for them to complete or expire; the replay submits
// and syncs one event at a time) no store races a hook, both engines read
// the same bytes at every hook, and the multisets are equal.
func compare(t *testing.T, o *original, p *replayed, exact bool) {
	t.Helper()
	var total, differ int
	for k, m0 := range o.starts {
		r := p.roots[k]
		if r == nil {
			t.Fatalf("root %v not replayed", k)
		}
		if d := vasmontest.Diff(m0, p.starts[k], 5); d != "" {
			t.Fatalf("root %v: the replay started from another tree: %s", k, d)
		}
		if o.live[k] != !r.Stopped() {
			t.Fatalf("root %v: live %v in the original, stopped %v in the replay", k, o.live[k], r.Stopped())
		}
		if o.live[k] {
			mem := p.sum.Live[k.vm].Mem
			want, _ := vasmontest.Walk(o.vm(k.vm).g.Mem, o.params[k])
			got, _ := vasmontest.Walk(mem, vasmontest.ParamsOf(r))
			if d := vasmontest.Diff(want, got, 5); d != "" {
				t.Fatalf("root %v: the replayed memory ends with another tree: %s", k, d)
			}
			var a, b [vasmon.PageSize]byte
			dump, _ := p.e.Dump(context.Background(), r)
			for _, ti := range dump {
				gpa := ti.GPA &^ (vasmon.PageSize - 1)
				_ = o.vm(k.vm).g.Mem.Read(gpa, a[:])
				_ = mem.Read(gpa, b[:])
				if a != b {
					t.Fatalf("root %v: hooked table %#x differs between the original and the replay", k, gpa)
				}
			}
		}
		a, b := multiset(o.cbs.Peek(k)), multiset(p.cbs.Peek(r.Ctx))
		total += len(a)
		if n := diffCount(a, b); n != 0 {
			differ++
			t.Logf("root %v: %d callbacks in the original, %d in the replay, %d in one only", k, len(a), len(b), n)
			if exact {
				onlyIn(t, "original", a, b)
				onlyIn(t, "replay", b, a)
				t.Fatalf("root %v: lockstep replay reported other callbacks", k)
			}
		}
	}
	t.Logf("%d roots, %d callbacks; %d roots with different callback multisets", len(o.starts), total, differ)
}

// onlyIn logs the first callbacks of a that b lacks.
func onlyIn(t *testing.T, name string, a, b []string) {
	in := map[string]int{}
	for _, x := range b {
		in[x]++
	}
	n := 0
	for _, x := range a {
		if in[x] > 0 {
			in[x]--
		} else if n++; n <= 10 {
			t.Logf("  only in the %s: %s", name, x)
		}
	}
}

// TestReplayDamaged replays a truncated and a corrupted trace: without
// Salvage, Run fails with the trace's error and offset; with it, Run applies
// every intact block, reports the damage, and the roots satisfy the oracle.
func TestReplayDamaged(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "run.trace")
	record(t, path, 1500, 77, false)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cut := data[:len(data)*3/5]
	flip := bytes.Clone(data)
	flip[len(data)/2] ^= 0x40
	for name, c := range map[string]struct {
		data []byte
		want error
	}{"truncated": {cut, trace.ErrTruncated}, "flipped": {flip, trace.ErrChecksum}} {
		t.Run(name, func(t *testing.T) {
			bad := filepath.Join(dir, name)
			if err := os.WriteFile(bad, c.data, 0o644); err != nil {
				t.Fatal(err)
			}
			// What a salvaging reader delivers.
			r, err := trace.NewReader(bytes.NewReader(c.data), trace.ReaderOptions{Salvage: true})
			if err != nil {
				t.Fatal(err)
			}
			var intact int64
			for _, err := r.Next(); err == nil; _, err = r.Next() {
				intact++
			}
			var te *trace.Error
			if !errors.As(r.Damage(), &te) || !errors.Is(te, c.want) {
				t.Fatalf("reader damage %v", r.Damage())
			}

			p, err := replayFile(t, bad, replay.Options{}, false)
			if !errors.Is(err, c.want) || !errors.As(err, &te) || te.Offset <= trace.HeaderSize {
				t.Fatalf("without salvage: %v", err)
			}
			if p.sum.Records != intact {
				t.Fatalf("without salvage: %d records applied before the error, want %d", p.sum.Records, intact)
			}
			t.Logf("without salvage: %v", err)

			p, err = replayFile(t, bad, replay.Options{Salvage: true}, false)
			if err != nil {
				t.Fatalf("salvage: %v", err)
			}
			if !errors.Is(p.sum.Damage, c.want) || p.sum.Records != intact || intact == 0 {
				t.Fatalf("salvage: %d records of %d, damage %v", p.sum.Records, intact, p.sum.Damage)
			}
			p.checkOracle(t)
			t.Logf("salvaged %d records, %d events, %d roots; damage: %v", p.sum.Records, p.sum.Events, p.sum.Roots, p.sum.Damage)
		})
	}
}

// TestReplayNonBlocking replays into an engine with tiny non-blocking
// queues: refused events are retried, none is lost.
func TestReplayNonBlocking(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run.trace")
	o := record(t, path, 400, 99, false)
	p, err := replayInto(t, engine.Config{Shards: 2, QueueDepth: 16, NonBlocking: true}, path, replay.Options{}, false)
	if err != nil {
		t.Fatal(err)
	}
	st := p.e.Stats()
	if p.sum.Events != int64(o.events) || st.Processed != uint64(p.sum.Events+p.sum.Synthetic) {
		t.Fatalf("%d events of %d replayed; engine processed %d, rejected %d", p.sum.Events, o.events, st.Processed, st.Rejected)
	}
	t.Logf("%d refusals retried", st.Rejected)
	p.checkOracle(t)
}

// handMade writes a trace from records.
func handMade(t *testing.T, recs ...trace.Record) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "hand.trace")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := trace.NewWriter(f, trace.Header{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range recs {
		if err := w.Write(&recs[i]); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func page(gpa uint64, entries ...uint64) trace.Record {
	b := make([]byte, trace.PageSize)
	for i, e := range entries {
		binary.LittleEndian.PutUint64(b[8*i:], e)
	}
	return trace.Record{Kind: trace.KindPage, VM: 1, GPA: gpa, Page: b}
}

// TestReplayPageAfterHook: a table the replay engine hooked before its Page
// record (here: hooked by Start, its content recorded after) is brought up
// to date by made-up write events, so its mappings are reported new and the
// oracle holds. The root uses the recorded bits (AsRecorded); an event of an
// unknown VM is skipped.
func TestReplayPageAfterHook(t *testing.T) {
	const flags = vasmon.BitP | vasmon.BitRW | vasmon.BitUS
	path := handMade(t,
		trace.Record{Kind: trace.KindVMAdd, VM: 1, RAM: 16 << 20},
		page(0x1000, 0x2000|flags),
		trace.Record{Kind: trace.KindRootStart, VM: 1, CR3: 0x1000, Mode: vasmon.Mode4, Monitored: vasmon.BitRW, Name: "init"},
		page(0x2000, 0x3000|flags),
		page(0x3000, 0x200000|vasmon.BitPS|flags),
		trace.Record{Kind: trace.KindEvent, VM: 9, GPA: 0x1000, Size: 8, Data: 1},
	)
	p, err := replayFile(t, path, replay.Options{AsRecorded: true, Request: backends.Request{Monitored: ^uint64(0)}}, false)
	if err != nil {
		t.Fatal(err)
	}
	if p.sum.Synthetic != 1 || p.sum.Skipped != 1 || p.sum.Pages != 3 {
		t.Fatalf("summary %+v", p.sum)
	}
	// Every record is accounted for: 6 in the trace (the End record says
	// so), 5 applied, the event of VM 9 skipped; one Page record made the
	// synthetic event.
	s := p.sum
	if !s.Complete || s.TraceRecords != 6 || s.Records != 6 || s.Applied != 5 || s.Applied+s.Skipped != s.Records ||
		s.Read[trace.KindPage] != 3 || s.Read[trace.KindEvent] != 1 || s.SkippedNoVM[trace.KindEvent] != 1 ||
		s.SkippedNoRoot != 0 || s.SyntheticPages != 1 || s.Unknown != 0 || s.Events != 0 {
		t.Fatalf("accounting %+v", s)
	}
	r := p.roots[rootKey{1, 0x1000}]
	if r.Monitored != vasmon.BitRW|vasmon.BitP || r.Ctx.(*backends.RootInfo).Name != "init" {
		t.Fatalf("root monitored %#x, context %+v", r.Monitored, r.Ctx)
	}
	p.checkOracle(t)
	want := []vasmontest.Event{{VA: 0, Old: 0, New: 0x200000 | vasmon.BitPS | flags, Size: 2 << 20}}
	if got := p.cbs.Peek(r.Ctx); !slices.Equal(got, want) {
		t.Fatalf("callbacks %v, want %v", got, want)
	}
	if n := p.sum.Live[1].Protected(); n != 3 {
		t.Fatalf("%d pages protected, want 3", n)
	}
}

// TestReplaySpeed replays a trace spanning 200 ms at the recorded pace, 4
// times faster, and as fast as possible, and cancels a paced replay.
func TestReplaySpeed(t *testing.T) {
	recs := []trace.Record{
		{Kind: trace.KindVMAdd, VM: 1, RAM: 16 << 20},
		page(0x1000),
		{Kind: trace.KindRootStart, VM: 1, CR3: 0x1000, Mode: vasmon.Mode4},
	}
	const span = 200 * time.Millisecond
	for i := 0; i <= 100; i++ {
		recs = append(recs, trace.Record{Kind: trace.KindEvent, VM: 1, Time: int64(span) * int64(i) / 100,
			GPA: 0x1000 + 8*uint64(i%4), Size: 8, Data: uint64(i%2) * 0x5007})
	}
	path := handMade(t, recs...)
	took := map[float64]time.Duration{}
	for _, speed := range []float64{replay.Recorded, 4, replay.Max} {
		start := time.Now()
		p, err := replayFile(t, path, replay.Options{Speed: speed}, false)
		took[speed] = time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		if p.sum.Span != span || p.sum.Events != 101 {
			t.Fatalf("speed %v: span %v, %d events", speed, p.sum.Span, p.sum.Events)
		}
		p.checkOracle(t)
		p.e.Close()
		t.Logf("speed %v: %v (trace span %v)", speed, took[speed], p.sum.Span)
	}
	if took[replay.Recorded] < span || took[4] < span/4 || took[4] >= took[replay.Recorded] || took[replay.Max] >= took[4] {
		t.Fatalf("replay times %v for a span of %v", took, span)
	}
	e, err := engine.New(engine.Config{Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	f, _ := os.Open(path)
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), span/4)
	defer cancel()
	start := time.Now()
	sum, err := replay.Run(ctx, e, f, replay.Options{Speed: replay.Recorded})
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > span*3/4 || sum.Events == 0 || sum.Events > 60 {
		t.Fatalf("cancelled after %v: %v, %d events", time.Since(start), err, sum.Events)
	}
}

// checkHost checks the oracle of each root just before the replay stops it
// (or removes its VM): the engine is synced, and the root's callbacks must
// turn its walk at start into a walk of the replayed memory now.
type checkHost struct {
	*engine.Engine
	t       *testing.T
	cbs     *vasmontest.Recorder
	mu      sync.Mutex
	starts  map[*vasmon.Root]vasmontest.Map
	mems    map[vasmon.VMID]*guestmem.Memory
	checked int
}

func (h *checkHost) onStart(r *vasmon.Root, mem *guestmem.Memory) {
	m, err := vasmontest.WalkRoot(mem, r)
	if err != nil {
		h.t.Error(err)
	}
	h.mu.Lock()
	h.starts[r], h.mems[r.VM.ID] = m, mem
	h.mu.Unlock()
}

func (h *checkHost) check(ctx context.Context, r *vasmon.Root) {
	if err := h.Sync(ctx); err != nil {
		h.t.Fatal(err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	m := h.starts[r].Clone()
	vasmontest.Apply(m, r.Mode, r.Monitored, h.cbs.Peek(r.Ctx))
	want, err := vasmontest.WalkRoot(h.mems[r.VM.ID], r)
	if err != nil {
		h.t.Fatal(err)
	}
	if d := vasmontest.Diff(want, m, 5); d != "" {
		h.t.Errorf("root %s: oracle violated before its stop: %s", r.Ctx.(*backends.RootInfo).Name, d)
	}
	h.checked++
}

func (h *checkHost) Stop(ctx context.Context, r *vasmon.Root) error {
	h.check(ctx, r)
	return h.Engine.Stop(ctx, r)
}

func (h *checkHost) RemoveVM(ctx context.Context, id vasmon.VMID) error {
	for _, r := range h.Roots() {
		if r.VM.ID == id {
			h.check(ctx, r)
		}
	}
	return h.Engine.RemoveVM(ctx, id)
}

// TestRecordReplaySim records the simulator (guest kernels whose stores to
// unprotected pages do not trap, so the Page records are the replay's only
// source for them) and replays it, checking the oracle of every root when
// it is stopped.
func TestRecordReplaySim(t *testing.T) {
	events := uint64(25000)
	if testing.Short() {
		events = 8000
	}
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "sim.trace")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	e1, err := engine.New(engine.Config{Shards: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e1.Close()
	rec := trace.NewRecorder(f, e1)
	cbs1 := vasmontest.NewRecorder()
	s, err := sim.New(sim.Config{VMs: 4, VCPUs: 2, RAM: 64 << 20, MaxEvents: events, Seed: 3})
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := s.Run(ctx, rec, backends.Request{Monitored: monitored, Callback: cbs1.Callback}); err != nil {
		t.Fatal(err)
	}
	t.Logf("recorded in %v", time.Since(t0))
	t0 = time.Now()
	if err := e1.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if err := rec.Close(); err != nil {
		t.Fatal(err)
	}
	st := s.Stats()

	e2, err := engine.New(engine.Config{Shards: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	h := &checkHost{Engine: e2, t: t, cbs: vasmontest.NewRecorder(), starts: map[*vasmon.Root]vasmontest.Map{},
		mems: map[vasmon.VMID]*guestmem.Memory{}}
	if _, err := f.Seek(0, 0); err != nil {
		t.Fatal(err)
	}
	sum, err := replay.Run(ctx, h, f, replay.Options{Request: backends.Request{Monitored: monitored, Callback: h.cbs.Callback},
		OnStart: h.onStart})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("replayed in %v", time.Since(t0))
	t.Logf("sim: %d events submitted; replay: %d records, %d bytes (%.1f B/event), %d events, %d pages, %d synthetic, %d roots, %d VMs; %d roots checked",
		st.Submitted, sum.Records, sum.Bytes, float64(sum.Bytes)/float64(sum.Events), sum.Events, sum.Pages, sum.Synthetic,
		sum.Roots, sum.VMs, h.checked)
	if uint64(sum.Events) != st.Submitted || sum.VMs != 4 || len(sum.Live) != 0 || h.checked != sum.Roots || sum.Skipped != 0 {
		t.Fatalf("summary %+v", sum)
	}
	// Every root was stopped: all it reported present is reported removed.
	for r, m := range h.starts {
		vasmontest.Apply(m, r.Mode, r.Monitored, h.cbs.Peek(r.Ctx))
		if len(m) != 0 {
			t.Fatalf("root %s: %d mappings left after its stop", r.Ctx.(*backends.RootInfo).Name, len(m))
		}
	}
	t.Logf("callbacks: %d in the original, %d in the replay", e1.Stats().Callbacks, e2.Stats().Callbacks)
}

// stampHost is an engine.Host that protects two pages when a VM is added
// and keeps the events submitted.
type stampHost struct {
	mem  vasmon.Memory
	prot vasmon.Protector
	evs  []shard.Event
}

func (h *stampHost) AddVM(_ vasmon.VMID, mem vasmon.Memory, prot vasmon.Protector, _ int64) error {
	h.mem, h.prot = mem, prot
	if err := prot.Protect(0x1000); err != nil {
		return err
	}
	return prot.Protect(0x2000)
}
func (h *stampHost) RemoveVM(context.Context, vasmon.VMID) error { return nil }
func (h *stampHost) Start(context.Context, vasmon.VMID, uint64, vasmon.Mode, uint64, vasmon.Callback, any,
	engine.RootOptions) (*vasmon.Root, error) {
	return nil, errors.New("no roots here")
}
func (h *stampHost) Stop(context.Context, *vasmon.Root) error { return nil }
func (h *stampHost) Submit(_ vasmon.VMID, evs []shard.Event) (int, error) {
	h.evs = append(h.evs, evs...)
	return len(evs), nil
}

// TestReplayStamps: the replayer's memory is versioned and its writes are
// trapped stores as the contract of vasmon.Versioned wants them: an event
// written to a protected page carries the stamp BeginWrite gave it (both
// pages' for a store that crosses a page boundary), one to an unprotected
// page none; a Page record written over a protected page is one stamped
// store per changed word. Old values are read from the replay's memory. Each page's change count ends at one per
// protection plus two per store.
func TestReplayStamps(t *testing.T) {
	path := handMade(t,
		trace.Record{Kind: trace.KindVMAdd, VM: 1, RAM: 16 << 20},
		trace.Record{Kind: trace.KindEvent, VM: 1, GPA: 0x1008, Size: 8, Data: 0x5007, HasOld: true, Old: 0xdead, RIP: 0x1234},
		trace.Record{Kind: trace.KindEvent, VM: 1, GPA: 0x3000, Size: 8, Data: 0x6007, RIP: 0x99},
		trace.Record{Kind: trace.KindEvent, VM: 1, GPA: 0x1FFE, Size: 4, Data: 0xAABBCCDD},
		page(0x1000, 1, 0x5007, 3),
		page(0x3000, 7),
	)
	h := &stampHost{}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sum, err := replay.Run(context.Background(), h, f, replay.Options{})
	if err != nil {
		t.Fatal(err)
	}
	vm, ok := h.mem.(vasmon.Versioned)
	if !ok {
		t.Fatalf("the host was given memory %T, not versioned", h.mem)
	}
	vs := vm.Versions()
	type stamp struct {
		gpa       uint64
		ver, ver2 uint32
	}
	var got []stamp
	for _, e := range h.evs {
		got = append(got, stamp{e.GPA, e.Ver, e.Ver2})
	}
	// Page 0x1000: protected (1), a store (2, 3), the crossing store (4, 5),
	// the words of the Page record that change: 0, 2 and the last, which
	// the crossing store wrote (6, 7; 8, 9; 10, 11); page 0x2000: protected
	// (1), the crossing store (2, 3); page 0x3000: never protected.
	want := []stamp{{0x1008, 2, 0}, {0x3000, 0, 0}, {0x1FFE, 4, 2}, {0x1000, 6, 0}, {0x1010, 8, 0}, {0x1FF8, 10, 0}}
	if !slices.Equal(got, want) {
		t.Errorf("events (gpa, ver, ver2) %v, want %v", got, want)
	}
	for _, c := range []struct {
		gpa  uint64
		want uint32
	}{{0x1000, 11}, {0x2000, 3}, {0x3000, 0}} {
		w := vs.Load(c.gpa)
		if guestmem.Count(w) != c.want || !guestmem.Stable(w) || (w&guestmem.VerProtected != 0) != (c.gpa != 0x3000) {
			t.Errorf("page %#x: version word %#x, want count %d, stable", c.gpa, w, c.want)
		}
	}
	// The first event's old value is this memory's, not the recorded one;
	// stamped, it goes without its RIP; the unstamped one keeps it.
	if e := h.evs[0]; !e.HasOld || e.Old != 0 || e.RIP != 0 || h.evs[1].RIP != 0x99 {
		t.Errorf("events %+v, %+v: want the first with old 0 (read here) and no RIP, the second with its RIP", e, h.evs[1])
	}
	if sum.Synthetic != 3 {
		t.Errorf("%d synthetic events, want 3", sum.Synthetic)
	}
	mem := sum.Live[1].Mem
	for _, c := range []struct{ gpa, want uint64 }{{0x1000, 1}, {0x1008, 0x5007}, {0x1FF8, 0}, {0x2000, 0xAABB}, {0x3000, 7}} {
		if v, _ := mem.ReadUint(c.gpa, 8); v != c.want {
			t.Errorf("memory at %#x: %#x, want %#x", c.gpa, v, c.want)
		}
	}
	// Unprotected, a page's stores are not stamped.
	if err := h.prot.Unprotect(0x1000); err != nil {
		t.Fatal(err)
	}
	if vs.Protected(0x1000) || guestmem.Count(vs.Load(0x1000)) != 12 {
		t.Errorf("page 0x1000 after Unprotect: version word %#x", vs.Load(0x1000))
	}
}

// TestReplaySync: the same trace replayed asynchronously and with
// Options.Sync gives the same accounting (records, applied, events, skipped),
// every event of the synchronous replay went through a Syncer (the engine's
// verdict counts), and in both every stopped root reported all it had
// removed.
func TestReplaySync(t *testing.T) {
	ctx := context.Background()
	var buf bytes.Buffer
	e1, err := engine.New(engine.Config{Shards: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e1.Close()
	rec := trace.NewRecorder(&buf, e1)
	s, err := sim.New(sim.Config{VMs: 2, VCPUs: 2, RAM: 64 << 20, MaxEvents: 6000, Seed: 5})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Run(ctx, rec, backends.Request{Monitored: monitored}); err != nil {
		t.Fatal(err)
	}
	if err := rec.Close(); err != nil {
		t.Fatal(err)
	}
	replayOnce := func(sync bool) (*replay.Summary, engine.Stats) {
		e, err := engine.New(engine.Config{Shards: 2})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		h := &checkHost{Engine: e, t: t, cbs: vasmontest.NewRecorder(), starts: map[*vasmon.Root]vasmontest.Map{},
			mems: map[vasmon.VMID]*guestmem.Memory{}}
		sum, err := replay.Run(ctx, h, bytes.NewReader(buf.Bytes()), replay.Options{Sync: sync,
			Request: backends.Request{Monitored: monitored, Callback: h.cbs.Callback}, OnStart: h.onStart})
		if err != nil {
			t.Fatal(err)
		}
		for r, m := range h.starts {
			vasmontest.Apply(m, r.Mode, r.Monitored, h.cbs.Peek(r.Ctx))
			if len(m) != 0 {
				t.Fatalf("sync %v: root %s: %d mappings left after its stop", sync, r.Ctx.(*backends.RootInfo).Name, len(m))
			}
		}
		if err := e.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		return sum, e.Stats()
	}
	a, as := replayOnce(false)
	y, ys := replayOnce(true)
	if a.Records != y.Records || a.Applied != y.Applied || a.Events != y.Events || a.Skipped != y.Skipped || a.Events == 0 {
		t.Errorf("accounting differs: async %+v, sync %+v", a, y)
	}
	for name, st := range map[string]engine.Stats{"async": as, "sync": ys} {
		if st.Submitted != st.Processed+st.Rejected {
			t.Errorf("%s: submitted %d != processed %d + rejected %d", name, st.Submitted, st.Processed, st.Rejected)
		}
	}
	if ys.Allowed+ys.Denied != uint64(y.Events+y.Synthetic) || ys.SyncStall.Count() != ys.Allowed+ys.Denied || as.SyncStall.Count() != 0 {
		t.Errorf("synchronous writes: %d allowed + %d denied, %d stalls, want %d events + %d synthetic (async stalls: %d)",
			ys.Allowed, ys.Denied, ys.SyncStall.Count(), y.Events, y.Synthetic, as.SyncStall.Count())
	}
	t.Logf("%d events (async %d synthetic, sync %d); sync stall p50 %v p99 %v", y.Events, a.Synthetic, y.Synthetic,
		time.Duration(ys.SyncStall.Quantile(0.5)), time.Duration(ys.SyncStall.Quantile(0.99)))
}
