package engine_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

const monitored = vasmon.BitRW | vasmon.BitUS | vasmon.BitNX | vasmon.BitD | 0xFFFFFFFFFF000

// testVM is one guest driven by a RandomWriter.
type testVM struct {
	id    vasmon.VMID
	g     *vasmontest.Guest
	w     *vasmontest.RandomWriter
	prot  *vasmontest.Protections
	roots []*vasmon.Root
	maps  []vasmontest.Map
}

type rootCtx struct {
	vm vasmon.VMID
	r  int
}

func newTestVM(t testing.TB, id vasmon.VMID, mode vasmon.Mode, seed uint64) *testVM {
	g := vasmontest.NewGuest(mode, 64<<20, 1<<20)
	v := &testVM{id: id, g: g, w: vasmontest.NewRandomWriter(g, seed, 12), prot: g.NewProtections()}
	for k := 0; k < 10; k++ {
		v.w.Next()
	}
	return v
}

func (v *testVM) cr3(r int) uint64 {
	if v.g.Mode == vasmon.ModePAE {
		return v.w.Tables[r] + uint64(32*r)
	}
	return v.w.Tables[r]
}

func toEvents(ws []vasmon.Write) []shard.Event {
	evs := make([]shard.Event, len(ws))
	for i, w := range ws {
		evs[i] = shard.Event{GPA: w.GPA, Data: w.Data, Old: w.Old, RIP: w.RIP, Size: w.Size, HasOld: w.HasOld,
			Ver: w.Ver, Ver2: w.Ver2, Trap: w.Trap, Stamped: w.Stamped}
	}
	return evs
}

func startVMs(t testing.TB, e *engine.Engine, rec *vasmontest.Recorder, vms []*testVM, nroots int) {
	for _, v := range vms {
		if err := e.AddVM(v.id, v.g.Memory(), v.prot, 0); err != nil {
			t.Fatal(err)
		}
		for r := 0; r < nroots; r++ {
			root, err := e.Start(context.Background(), v.id, v.cr3(r), v.g.Mode, monitored, rec.Callback, rootCtx{v.id, r}, engine.RootOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if evs := rec.Take(rootCtx{v.id, r}); len(evs) != 0 {
				t.Fatalf("Start reported %d callbacks", len(evs))
			}
			m, err := vasmontest.WalkRoot(v.g.Mem, root)
			if err != nil {
				t.Fatal(err)
			}
			v.roots = append(v.roots, root)
			v.maps = append(v.maps, m)
		}
	}
}

var engineOf = map[string]*engine.Engine{}

func checkOracle(t testing.TB, rec *vasmontest.Recorder, vms []*testVM) {
	t.Helper()
	for _, v := range vms {
		for r, root := range v.roots {
			vasmontest.Apply(v.maps[r], v.g.Mode, root.Monitored, rec.Take(rootCtx{v.id, r}))
			want, err := vasmontest.WalkRoot(v.g.Mem, root)
			if err != nil {
				t.Fatal(err)
			}
			if d := vasmontest.Diff(want, v.maps[r], 10); d != "" {
				for _, s := range engineOf[t.Name()].Shards() {
					t.Logf("shard %d: misses %d deferred %d dropped %d expired %d stale reads %d resyncs %d", s.ID(),
						s.C.Misses.Load(), s.C.Deferred.Load(), s.C.Dropped.Load(), s.C.Expired.Load(), s.C.StaleReads.Load(), s.C.Resyncs.Load())
				}
				dump, _ := engineOf[t.Name()].Dump(context.Background(), root)
				for _, ti := range dump {
					t.Logf("hooked: L%d gpa=%#x va=%#x present=%d", ti.Level, ti.GPA, ti.VA, ti.Present)
				}
				t.Fatalf("VM %d (%v) root %d: oracle violated: %s", v.id, v.g.Mode, r, d)
			}
		}
		if len(v.prot.Errors) > 0 {
			t.Fatalf("VM %d protection errors: %v", v.id, v.prot.Errors)
		}
	}
}

func stopAll(t testing.TB, e *engine.Engine, rec *vasmontest.Recorder, vms []*testVM) {
	t.Helper()
	for _, v := range vms {
		for r, root := range v.roots {
			if err := e.Stop(context.Background(), root); err != nil {
				t.Fatal(err)
			}
			vasmontest.Apply(v.maps[r], v.g.Mode, root.Monitored, rec.Take(rootCtx{v.id, r}))
			if len(v.maps[r]) != 0 {
				t.Fatalf("VM %d root %d: %d mappings not reported removed by Stop", v.id, r, len(v.maps[r]))
			}
			if n := root.Tables(); n != 0 {
				t.Fatalf("VM %d root %d: %d tables still hooked after Stop", v.id, r, n)
			}
		}
		if n := v.prot.Count(); n != 0 {
			t.Fatalf("VM %d: %d pages still protected", v.id, n)
		}
	}
}

func checkAccounting(t testing.TB, e *engine.Engine) engine.Stats {
	t.Helper()
	st := e.Stats()
	if st.Submitted != st.Processed+st.Rejected {
		t.Fatalf("lost events: submitted %d != processed %d + rejected %d", st.Submitted, st.Processed, st.Rejected)
	}
	var kinds uint64
	for _, k := range st.Kinds {
		kinds += k
	}
	if kinds != st.Processed {
		t.Fatalf("events by kind %d != processed %d", kinds, st.Processed)
	}
	return st
}

// TestOracleConcurrent drives several VMs in every paging mode from
// concurrent producers and checks, once the engine is quiescent, that every
// root's reported stream turns its initial map into a full walk of memory.
func TestOracleConcurrent(t *testing.T) {
	steps := 3000
	if testing.Short() {
		steps = 600
	}
	for _, shards := range []int{1, 2, 4} {
		for seed := uint64(1); seed <= 2; seed++ {
			t.Run(fmt.Sprintf("shards=%d/seed=%d", shards, seed), func(t *testing.T) {
				e, err := engine.New(engine.Config{Shards: shards, QueueDepth: 256})
				if err != nil {
					t.Fatal(err)
				}
				defer e.Close()
				rec := vasmontest.NewRecorder()
				engineOf[t.Name()] = e
				var vms []*testVM
				for i := 0; i < 8; i++ {
					vms = append(vms, newTestVM(t, vasmon.VMID(i+1), vasmon.Modes[i%4], seed*100+uint64(i)))
				}
				startVMs(t, e, rec, vms, 2)
				var wg sync.WaitGroup
				for _, v := range vms {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for k := 0; k < steps; k++ {
							if _, err := e.Submit(v.id, toEvents(v.w.Next())); err != nil {
								t.Error(err)
								return
							}
						}
					}()
				}
				wg.Wait()
				if err := e.Sync(context.Background()); err != nil {
					t.Fatal(err)
				}
				checkOracle(t, rec, vms)
				st := checkAccounting(t, e)
				if st.Kinds[vasmon.WriteRelevant] == 0 || st.Callbacks == 0 {
					t.Fatalf("no relevant events: %+v", st.Kinds)
				}
				stopAll(t, e, rec, vms)
			})
		}
	}
}

// structural reports whether a write may link or unlink a table: its old or
// new entry value is present with PS clear, or PS changes.
func structural(evs []vasmon.Write, g *vasmontest.Guest, before uint64) bool {
	after := g.Entry(evs[0].GPA&^uint64(g.Mode.EntryBytes()-1), 0)
	for _, v := range []uint64{before, after} {
		if v&vasmon.BitP != 0 && v&vasmon.BitPS == 0 {
			return true
		}
	}
	return (before^after)&vasmon.BitPS != 0
}

// TestEquivalence feeds the same events to the engine (1, 2 and 4 shards) and
// to the single-threaded monitor and requires, at every quiescent point (the
// engine synced, the monitor flushed), the same translation map of every
// root from both callback streams, equal to a full walk. (The streams
// themselves may differ: the engine processes a write later than the
// monitor, when guest memory may hold a later value of the entry; a value it
// can no longer prove in memory is not reported, and the page is read again
// instead; see package vasmon.) Events are submitted in batches; a batch
// ends after any write that may link or unlink a table and the engine is
// synced there, since across shards nothing orders a table's writes with
// its linking (see the package documentation).
func TestEquivalence(t *testing.T) {
	steps := 1500
	if testing.Short() {
		steps = 300
	}
	for _, shards := range []int{1, 2, 4} {
		t.Run(fmt.Sprintf("shards=%d", shards), func(t *testing.T) {
			e, err := engine.New(engine.Config{Shards: shards})
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			engineOf[t.Name()] = e
			mon := vasmon.NewMonitor()
			recE, recM := vasmontest.NewRecorder(), vasmontest.NewRecorder()
			var vms []*testVM
			for i := 0; i < 4; i++ {
				v := newTestVM(t, vasmon.VMID(i+1), vasmon.Modes[i], uint64(40+i))
				vms = append(vms, v)
				if err := mon.AddVM(v.id, v.g.Mem, vasmontest.NewProtections(), 0); err != nil {
					t.Fatal(err)
				}
				for r := 0; r < 2; r++ {
					if _, err := mon.Start(v.id, v.cr3(r), v.g.Mode, monitored, recM.Callback, rootCtx{v.id, r}, vasmon.Options{}); err != nil {
						t.Fatal(err)
					}
				}
			}
			startVMs(t, e, recE, vms, 2)
			monMaps := make([][]vasmontest.Map, len(vms))
			for i, v := range vms {
				for r := range 2 {
					monMaps[i] = append(monMaps[i], v.maps[r].Clone())
				}
			}
			syncs, batched := 0, 0
			compare := func() {
				t.Helper()
				if err := e.Sync(context.Background()); err != nil {
					t.Fatal(err)
				}
				if err := mon.Flush(); err != nil {
					t.Fatal(err)
				}
				syncs++
				for i, v := range vms {
					for r := range 2 {
						vasmontest.Apply(monMaps[i][r], v.g.Mode, v.roots[r].Monitored, recM.Take(rootCtx{v.id, r}))
					}
				}
				checkOracle(t, recE, vms)
				for i, v := range vms {
					for r := range 2 {
						if d := vasmontest.Diff(monMaps[i][r], v.maps[r], 5); d != "" {
							t.Fatalf("VM %d root %d: the engine's map differs from the monitor's: %s", v.id, r, d)
						}
					}
				}
			}
			for k := 0; k < steps; k++ {
				v := vms[k%len(vms)]
				ws := v.w.Next()
				for _, w := range ws {
					if _, err := mon.Write(v.id, w); err != nil {
						t.Fatal(err)
					}
				}
				if _, err := e.Submit(v.id, toEvents(ws)); err != nil {
					t.Fatal(err)
				}
				if structural(ws, v.g, ws[0].Old) || !ws[0].HasOld {
					compare()
				} else {
					batched++
				}
			}
			compare()
			if batched == 0 || syncs < 2 {
				t.Fatalf("%d events batched, %d quiescent points", batched, syncs)
			}
			checkAccounting(t, e)
		})
	}
}

// TestStartStopUnderTraffic starts and stops roots and adds and removes VMs
// while producers submit, then checks the accounting and that every page
// protection was released.
func TestStartStopUnderTraffic(t *testing.T) {
	e, err := engine.New(engine.Config{Shards: 2, QueueDepth: 128})
	if err != nil {
		t.Fatal(err)
	}
	rec := vasmontest.NewRecorder()
	var vms []*testVM
	for i := 0; i < 4; i++ {
		vms = append(vms, newTestVM(t, vasmon.VMID(i+1), vasmon.Modes[i], uint64(70+i)))
	}
	startVMs(t, e, rec, vms, 1)
	ctx := context.Background()
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var mu sync.Mutex // guards each guest's writer against the churn goroutine
	for _, v := range vms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				mu.Lock()
				evs := toEvents(v.w.Next())
				mu.Unlock()
				if _, err := e.Submit(v.id, evs); err != nil && !errors.Is(err, vasmon.ErrUnknownVM) {
					t.Error(err)
					return
				}
			}
		}()
	}
	iters := 40
	if testing.Short() {
		iters = 10
	}
	for k := 0; k < iters; k++ {
		v := vms[k%len(vms)]
		root, err := e.Start(ctx, v.id, v.cr3(1), v.g.Mode, monitored, rec.Callback, rootCtx{v.id, 1}, engine.RootOptions{})
		if err != nil {
			t.Fatal(err)
		}
		// Let some traffic reach the new root's shards.
		before := e.Stats().Processed
		waitFor(t, "events processed", func() bool { return e.Stats().Processed >= before+64 })
		if err := e.Stop(ctx, root); err != nil {
			t.Fatal(err)
		}
		if k%10 == 9 { // remove and re-add a VM under traffic
			if err := e.RemoveVM(ctx, v.id); err != nil {
				t.Fatal(err)
			}
			if err := e.AddVM(v.id, v.g.Memory(), v.prot, 0); err != nil {
				t.Fatal(err)
			}
			if _, err := e.Start(ctx, v.id, v.cr3(0), v.g.Mode, monitored, rec.Callback, rootCtx{v.id, 0}, engine.RootOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	close(stop)
	wg.Wait()
	if err := e.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	checkAccounting(t, e)
	for _, r := range e.Roots() {
		if err := e.Stop(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	for _, v := range vms {
		if n := v.prot.Count(); n != 0 {
			t.Fatalf("VM %d: %d pages still protected", v.id, n)
		}
		if len(v.prot.Errors) > 0 {
			t.Fatalf("protection errors: %v", v.prot.Errors)
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestCloseUnderLoad closes the engine while producers are blocked on full
// queues: every event is processed or rejected with ErrClosed.
func TestCloseUnderLoad(t *testing.T) {
	e, err := engine.New(engine.Config{Shards: 2, QueueDepth: 16})
	if err != nil {
		t.Fatal(err)
	}
	block := make(chan struct{})
	prot := vasmontest.NewProtections()
	g := vasmontest.NewGuest(vasmon.Mode4, 16<<20, 1<<20)
	w := vasmontest.NewRandomWriter(g, 5, 8)
	if err := e.AddVM(1, g.Mem, prot, 0); err != nil {
		t.Fatal(err)
	}
	// A slow callback keeps the queues full.
	var once sync.Once
	entered := make(chan struct{})
	cb := func(any, uint64, uint64, uint64, uint64) { once.Do(func() { close(entered); <-block }) }
	if _, err := e.Start(context.Background(), 1, w.Tables[0], vasmon.Mode4, monitored, cb, nil, engine.RootOptions{}); err != nil {
		t.Fatal(err)
	}
	var evs [][]shard.Event
	for k := 0; k < 2000; k++ {
		evs = append(evs, toEvents(w.Next()))
	}
	var wg sync.WaitGroup
	var closedErrs sync.Map
	for p := 0; p < 4; p++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := p; k < len(evs); k += 4 {
				if _, err := e.Submit(1, evs[k]); err != nil {
					closedErrs.Store(err.Error(), true)
					if !errors.Is(err, engine.ErrClosed) {
						t.Error(err)
					}
					return
				}
			}
		}()
	}
	<-entered
	// Unblock the callback once Close has begun (Submit says so).
	go func() {
		for {
			if _, err := e.Submit(1, nil); errors.Is(err, engine.ErrClosed) {
				close(block)
				return
			}
			runtime.Gosched()
		}
	}()
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	st := checkAccounting(t, e)
	if st.Processed == 0 {
		t.Fatal("nothing processed")
	}
	if _, err := e.Submit(1, evs[0]); !errors.Is(err, engine.ErrClosed) {
		t.Fatalf("Submit after Close: %v", err)
	}
}

// TestOverload fills a queue in non-blocking mode: Submit returns
// ErrOverload with the number queued, and the counters add up.
func TestOverload(t *testing.T) {
	e, err := engine.New(engine.Config{Shards: 1, QueueDepth: 8, NonBlocking: true})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	g, root, l1 := chainGuest()
	if err := e.AddVM(1, g.Memory(), g.NewProtections(), 0); err != nil {
		t.Fatal(err)
	}
	block, entered := make(chan struct{}), make(chan struct{})
	var once sync.Once
	cb := func(any, uint64, uint64, uint64, uint64) { once.Do(func() { close(entered); <-block }) }
	if _, err := e.Start(context.Background(), 1, root, vasmon.Mode4, monitored, cb, nil, engine.RootOptions{}); err != nil {
		t.Fatal(err)
	}
	// The first event reaches the callback and blocks the worker.
	first := toEvents([]vasmon.Write{g.SetEntry(l1, 0, 0x200000|vasmon.BitP)})
	if _, err := e.Submit(1, first); err != nil {
		t.Fatal(err)
	}
	<-entered
	batch := make([]shard.Event, 100)
	for i := range batch {
		batch[i] = first[0]
	}
	n, err := e.Submit(1, batch)
	if !errors.Is(err, engine.ErrOverload) || n >= len(batch) {
		t.Fatalf("Submit = %d, %v; want ErrOverload after fewer than %d", n, err, len(batch))
	}
	close(block)
	if err := e.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	st := checkAccounting(t, e)
	if st.Rejected != uint64(len(batch)-n) {
		t.Fatalf("rejected %d, want %d", st.Rejected, len(batch)-n)
	}
}

// TestCallbackPanic: a panicking callback is recovered, counted, reported
// with its root, and the shard keeps processing.
func TestCallbackPanic(t *testing.T) {
	var mu sync.Mutex
	var reported []*vasmon.Root
	e, err := engine.New(engine.Config{Shards: 2, OnPanic: func(r *vasmon.Root, v any) {
		mu.Lock()
		reported = append(reported, r)
		mu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	g := vasmontest.NewGuest(vasmon.Mode4, 16<<20, 1<<20)
	if err := e.AddVM(1, g.Mem, vasmontest.NewProtections(), 0); err != nil {
		t.Fatal(err)
	}
	calls := 0
	cb := func(any, uint64, uint64, uint64, uint64) {
		mu.Lock()
		calls++
		mu.Unlock()
		panic("boom")
	}
	rootGPA := g.AllocTable()
	root, err := e.Start(context.Background(), 1, rootGPA, vasmon.Mode4, monitored, cb, nil, engine.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10; i++ { // ten 1 GiB pages, each in its own PDPT
		evs := g.Map(rootGPA, uint64(i+1)<<39, 3, uint64(i+1)<<30, vasmon.BitRW)
		if _, err := e.Submit(1, toEvents(evs)); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	st := e.Stats()
	if st.Panics != 10 || e.RootPanics(root.ID) != 10 || calls != 10 {
		t.Fatalf("panics %d (root %d), calls %d; want 10", st.Panics, e.RootPanics(root.ID), calls)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(reported) != 10 || reported[0] != root {
		t.Fatalf("OnPanic told of %d panics", len(reported))
	}
}

// TestSerializeCallbacks: with SerializeCallbacks, a root's callbacks never
// overlap even though its tables live on different shards.
func TestSerializeCallbacks(t *testing.T) {
	e, err := engine.New(engine.Config{Shards: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	g := vasmontest.NewGuest(vasmon.Mode4, 64<<20, 1<<20)
	if err := e.AddVM(1, g.Mem, vasmontest.NewProtections(), 0); err != nil {
		t.Fatal(err)
	}
	rootGPA := g.AllocTable()
	// 64 leaf tables spread over the shards.
	var leaves []uint64
	for i := 0; i < 64; i++ {
		g.Map(rootGPA, uint64(i)<<21, 1, 0x1000, vasmon.BitRW)
		leaves = append(leaves, uint64(i)<<21)
	}
	var inside, overlaps, calls int32
	var mu sync.Mutex
	cb := func(any, uint64, uint64, uint64, uint64) {
		mu.Lock()
		inside++
		if inside > 1 {
			overlaps++
		}
		calls++
		mu.Unlock()
		for range 8 { // widen the window in which another callback could enter
			runtime.Gosched()
		}
		mu.Lock()
		inside--
		mu.Unlock()
	}
	if _, err := e.Start(context.Background(), 1, rootGPA, vasmon.Mode4, monitored, cb, nil, engine.RootOptions{SerializeCallbacks: true}); err != nil {
		t.Fatal(err)
	}
	for round := 0; round < 5; round++ {
		var evs []vasmon.Write
		for _, va := range leaves {
			evs = append(evs, g.Map(rootGPA, va+uint64(round+1)<<12, 1, 0x2000, vasmon.BitRW)...)
		}
		if _, err := e.Submit(1, toEvents(evs)); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if calls != 5*64 || overlaps != 0 {
		t.Fatalf("calls %d (want %d), overlapping calls %d", calls, 5*64, overlaps)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, c := range []engine.Config{
		{Shards: -1},
		{CPUs: []int{4095}},
		{CPUs: []int{}},
		{Budget: -time.Second},
		{QueueDepth: -1},
		{MaxVMs: 1 << 16},
	} {
		if e, err := engine.New(c); err == nil {
			e.Close()
			t.Errorf("New(%+v) succeeded", c)
		}
	}
}

// TestPinning: workers are pinned to the allowed CPUs of this machine.
func TestPinning(t *testing.T) {
	cpus, err := shard.AllowedCPUs()
	if err != nil {
		t.Skipf("SKIPPED LOUDLY: cannot read the CPU affinity here: %v", err)
	}
	e, err := engine.New(engine.Config{Shards: len(cpus)})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if errs := e.PinErrors(); len(errs) != 0 {
		t.Fatalf("pinning failed on this machine: %v", errs)
	}
}

func TestErrors(t *testing.T) {
	e, err := engine.New(engine.Config{Shards: 1, MaxVMs: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	g := vasmontest.NewGuest(vasmon.Mode4, 1<<20, 0)
	p := vasmontest.NewProtections()
	ctx := context.Background()
	cb := func(any, uint64, uint64, uint64, uint64) {}
	if _, err := e.Start(ctx, 1, 0, vasmon.Mode4, 0, cb, nil, engine.RootOptions{}); !errors.Is(err, vasmon.ErrUnknownVM) {
		t.Fatalf("Start on unknown VM: %v", err)
	}
	if err := e.AddVM(1, g.Mem, p, 0); err != nil {
		t.Fatal(err)
	}
	if err := e.AddVM(1, g.Mem, p, 0); !errors.Is(err, vasmon.ErrVMExists) {
		t.Fatalf("duplicate AddVM: %v", err)
	}
	if err := e.AddVM(2, g.Mem, p, 0); !errors.Is(err, engine.ErrTooMany) {
		t.Fatalf("AddVM past MaxVMs: %v", err)
	}
	if _, err := e.Start(ctx, 1, 1<<30, vasmon.Mode4, 0, cb, nil, engine.RootOptions{}); !errors.Is(err, vasmon.ErrRootOutside) {
		t.Fatalf("root outside RAM: %v", err)
	}
	if _, err := e.Start(ctx, 1, 0, vasmon.Mode(9), 0, cb, nil, engine.RootOptions{}); !errors.Is(err, vasmon.ErrBadMode) {
		t.Fatalf("bad mode: %v", err)
	}
	r, err := e.Start(ctx, 1, 0, vasmon.Mode4, 0, cb, nil, engine.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Start(ctx, 1, 0, vasmon.Mode4, 0, cb, nil, engine.RootOptions{}); !errors.Is(err, vasmon.ErrRootExists) {
		t.Fatalf("duplicate root: %v", err)
	}
	if err := e.Stop(ctx, r); err != nil {
		t.Fatal(err)
	}
	if err := e.Stop(ctx, r); !errors.Is(err, vasmon.ErrUnknownRoot) {
		t.Fatalf("double Stop: %v", err)
	}
	if _, err := e.Submit(7, make([]shard.Event, 3)); !errors.Is(err, vasmon.ErrUnknownVM) {
		t.Fatalf("Submit to unknown VM: %v", err)
	}
	checkAccounting(t, e)
}

// TestStartStopAcrossClose: Start and Stop calls in progress when the engine
// closes return (nil or ErrClosed) instead of waiting on workers that have
// stopped.
func TestStartStopAcrossClose(t *testing.T) {
	g := vasmontest.NewGuest(vasmon.Mode4, 16<<20, 1<<20)
	w := vasmontest.NewRandomWriter(g, 9, 8)
	for k := 0; k < 50; k++ {
		w.Next()
	}
	for iter := 0; iter < 30; iter++ {
		e, err := engine.New(engine.Config{Shards: 2})
		if err != nil {
			t.Fatal(err)
		}
		if err := e.AddVM(1, g.Mem, vasmontest.NewProtections(), 0); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 4)
		var last atomic.Pointer[vasmon.Root]
		var cycles atomic.Int64
		for p := 0; p < 4; p++ {
			go func() {
				for k := 0; ; k++ {
					r, err := e.Start(context.Background(), 1, w.Tables[0], vasmon.Mode4, monitored, func(any, uint64, uint64, uint64, uint64) {}, nil, engine.RootOptions{})
					if err == nil {
						last.Store(r)
						err = e.Stop(context.Background(), r)
						cycles.Add(1)
					}
					switch {
					case errors.Is(err, engine.ErrClosed):
						done <- nil
						return
					case err != nil && !errors.Is(err, vasmon.ErrRootExists) && !errors.Is(err, vasmon.ErrUnknownRoot):
						done <- err
						return
					}
				}
			}()
		}
		// Close after a varying number of Start/Stop cycles.
		n := int64(iter % 7)
		waitFor(t, "Start/Stop cycles", func() bool { return cycles.Load() >= n })
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
		timeout := time.After(20 * time.Second)
		for p := 0; p < 4; p++ {
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-timeout:
				t.Fatalf("iteration %d: a Start or Stop still waits 20 s after Close", iter)
			}
		}
		if r := last.Load(); r != nil {
			_, _ = e.Dump(context.Background(), r) // runs on the caller's goroutine now the workers have stopped
		}
	}
}

// TestStaleVersion: an event stamped (Event.Ver) before the page's last
// read is dropped as already in the read, and counted stale; one stamped
// after is applied.
func TestStaleVersion(t *testing.T) {
	g, cr3, tab := chainGuest()
	flags := vasmon.BitP | vasmon.BitRW | vasmon.BitUS
	leaf := uint64(0x123000) | flags
	g.SetEntry(tab, 7, leaf)
	e, err := engine.New(engine.Config{Shards: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := e.AddVM(1, g.Memory(), g.NewProtections(), 0); err != nil {
		t.Fatal(err)
	}
	rec := vasmontest.NewRecorder()
	ctx := context.Background()
	r, err := e.Start(ctx, 1, cr3, vasmon.Mode4, monitored, rec.Callback, "r", engine.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Two trapped writes (the second restores the entry), left queued
	// while the root stops and starts again, which reads the page.
	stale := toEvents([]vasmon.Write{g.SetEntry(tab, 7, 0)})
	g.SetEntry(tab, 7, leaf)
	if stale[0].Ver == 0 {
		t.Fatal("a write of a protected page was not stamped")
	}
	if err := e.Stop(ctx, r); err != nil {
		t.Fatal(err)
	}
	rec.Take("r")
	if _, err := e.Start(ctx, 1, cr3, vasmon.Mode4, monitored, rec.Callback, "r", engine.RootOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Submit(1, stale); err != nil {
		t.Fatal(err)
	}
	// The same write made now: applied.
	fresh := toEvents([]vasmon.Write{g.SetEntry(tab, 7, 0)})
	if _, err := e.Submit(1, fresh); err != nil {
		t.Fatal(err)
	}
	if err := e.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if n := e.Stats().StaleWrites; n != 1 {
		t.Errorf("stale events counted: %d, want 1", n)
	}
	evs := rec.Take("r")
	if len(evs) != 1 || evs[0].Old != leaf || evs[0].New != 0 {
		t.Errorf("callbacks %v, want one removal of %#x", evs, leaf)
	}
}

// TestLatencyTiming: the recorded trap-to-callback latency is never below
// the true one (the time the callback started), and with slow callbacks it
// stays close to it (each is timed on its own, not with a group).
func TestLatencyTiming(t *testing.T) {
	for _, c := range []struct {
		name string
		work time.Duration // each callback's own duration
		tol  time.Duration // how far above the truth the median may be
	}{
		{"fast", 0, 0},
		{"slow", 100 * time.Microsecond, 50 * time.Microsecond},
	} {
		t.Run(c.name, func(t *testing.T) {
			g, cr3, tab := chainGuest()
			flags := vasmon.BitP | vasmon.BitRW | vasmon.BitUS
			e, err := engine.New(engine.Config{Shards: 1})
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			if err := e.AddVM(1, g.Mem, vasmontest.NewProtections(), 0); err != nil {
				t.Fatal(err)
			}
			var trap int64
			var truth []int64
			cb := func(any, uint64, uint64, uint64, uint64) {
				truth = append(truth, shard.Now()-trap) // one worker: no race
				for start := time.Now(); time.Since(start) < c.work; {
				}
			}
			if _, err := e.Start(context.Background(), 1, cr3, vasmon.Mode4, monitored, cb, nil, engine.RootOptions{}); err != nil {
				t.Fatal(err)
			}
			var evs []shard.Event
			for i := 0; i < 48; i++ {
				evs = append(evs, toEvents([]vasmon.Write{g.SetEntry(tab, i, uint64(0x100000+i<<12)|flags)})...)
			}
			trap = shard.Now()
			for i := range evs {
				evs[i].Trap = trap
			}
			if _, err := e.Submit(1, evs); err != nil {
				t.Fatal(err)
			}
			if err := e.Sync(context.Background()); err != nil {
				t.Fatal(err)
			}
			st := e.Stats()
			if st.Latency.Count() != uint64(len(truth)) || len(truth) != len(evs) {
				t.Fatalf("%d latencies recorded, %d callbacks, %d events", st.Latency.Count(), len(truth), len(evs))
			}
			slices.Sort(truth)
			for _, q := range []float64{0.1, 0.5, 0.9, 1} {
				want := truth[max(1, int(math.Ceil(q*float64(len(truth)))))-1] // rank ceil(q*n), as Quantile

				// (The engine reads the clock just before it calls.)
				if got := st.Latency.Quantile(q); got < want-int64(2*time.Microsecond) {
					t.Errorf("q%.2f: recorded %v, below the true %v", q, time.Duration(got), time.Duration(want))
				}
			}
			if c.tol > 0 {
				want := truth[len(truth)/2-1]
				if got := st.Latency.Quantile(0.5); time.Duration(got-want) > c.tol+time.Duration(want/16) {
					t.Errorf("median recorded %v, true %v: over-stated by more than %v", time.Duration(got), time.Duration(want), c.tol)
				}
			}
		})
	}
}

// TestAliasBomb: a 4-level alias bomb (every entry of each level links the
// same page of the level below: 256 * 512^2 tables claimed) at the default
// budgets: Start hooks exactly the budget and Stop removes it with unhook
// requests only for the tables hooked (not for the 512 links of every
// hooked table), in bounded time, leaving nothing protected.
func TestAliasBomb(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: about 10 s")
	}
	g := vasmontest.NewGuest(vasmon.Mode4, 16<<20, 1<<20)
	flags := vasmon.BitP | vasmon.BitRW | vasmon.BitUS
	var pages [5]uint64
	for l := 4; l >= 1; l-- {
		pages[l] = g.AllocTable()
	}
	for l := 4; l >= 1; l-- {
		n := 512
		if l == 4 {
			n = 256
		}
		for i := 0; i < n; i++ {
			if l == 1 {
				g.SetEntry(pages[1], i, uint64(0x100000+i<<12)|flags)
			} else {
				g.SetEntry(pages[l], i, pages[l-1]|flags)
			}
		}
	}
	e, err := engine.New(engine.Config{Shards: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	prot := vasmontest.NewProtections()
	if err := e.AddVM(1, g.Mem, prot, 0); err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int64
	cb := func(any, uint64, uint64, uint64, uint64) { calls.Add(1) }
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	t0 := time.Now()
	r, err := e.Start(ctx, 1, pages[4], vasmon.Mode4, monitored, cb, nil, engine.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Since(t0)
	if r.Tables() != vasmon.DefaultRootTables || r.Stats().Refused == 0 {
		t.Fatalf("hooked %d tables (budget %d), refused %d", r.Tables(), vasmon.DefaultRootTables, r.Stats().Refused)
	}
	t0 = time.Now()
	if err := e.Stop(ctx, r); err != nil {
		t.Fatal(err)
	}
	stop := time.Since(t0)
	if err := e.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	st := e.Stats()
	var misses uint64
	for _, s := range e.Shards() {
		misses += s.C.Misses.Load()
	}
	t.Logf("Start %v, Stop %v; %d messages; %d unhooks of tables never hooked; %d callbacks", start, stop, st.Messages, misses, calls.Load())
	// Unhook requests went only to the tables hooked: the 512 links of
	// every hooked table past the budget cost nothing.
	if misses != 0 {
		t.Errorf("%d unhook requests for tables never hooked (budget %d)", misses, vasmon.DefaultRootTables)
	}
	if stop > 20*time.Second || start > 40*time.Second {
		t.Errorf("Start %v, Stop %v", start, stop)
	}
	if st.Tables != 0 || prot.Count() != 0 {
		t.Errorf("after Stop: %d tables, %d pages protected", st.Tables, prot.Count())
	}
	if st.Hooks != uint64(vasmon.DefaultRootTables) || st.Unhooks != st.Hooks {
		t.Errorf("%d tables hooked and %d unhooked, want the budget %d each", st.Hooks, st.Unhooks, vasmon.DefaultRootTables)
	}
}

// chainGuest returns a 4-level guest whose root links one table per level
// through entry 0, and its level-1 table (empty).
// waitFor waits until cond holds, yielding meanwhile, and fails the test
// if it does not within a minute (a hang).
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited a minute for %s", what)
		}
		runtime.Gosched()
	}
}

func chainGuest() (g *vasmontest.Guest, cr3, l1 uint64) {
	g = vasmontest.NewGuest(vasmon.Mode4, 16<<20, 1<<20)
	cr3 = g.AllocTable()
	l1 = cr3
	for l := 4; l > 1; l-- {
		nt := g.AllocTable()
		g.SetEntry(l1, 0, nt|vasmon.BitP|vasmon.BitRW|vasmon.BitUS)
		l1 = nt
	}
	return g, cr3, l1
}
