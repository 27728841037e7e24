package engine_test

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// Regression tests of issue 11 (engine defects), one per item.

// adjacentOnShards returns two adjacent table pages of g whose pages the
// engine routes to different shards.
func adjacentOnShards(t *testing.T, e *engine.Engine, g *vasmontest.Guest, vm vasmon.VMID) (a, b uint64) {
	t.Helper()
	a = g.AllocTable()
	for k := 0; k < 64; k++ {
		b = g.AllocTable()
		if b == a+vasmon.PageSize && e.ShardOf(vm, a) != e.ShardOf(vm, b) {
			return a, b
		}
		a = b
	}
	t.Fatal("no two adjacent pages on different shards")
	return 0, 0
}

// Item 1: a store that crosses a page boundary is processed by the shards
// of both pages (it used to go whole to the first page's shard, which
// dropped the second part).
func TestPageCrossingStore(t *testing.T) {
	for _, shards := range []int{2, 4} {
		for _, mode := range []vasmon.Mode{vasmon.Mode32, vasmon.Mode4} {
			t.Run(fmt.Sprintf("%v/shards=%d", mode, shards), func(t *testing.T) {
				e, err := engine.New(engine.Config{Shards: shards})
				if err != nil {
					t.Fatal(err)
				}
				defer e.Close()
				g := vasmontest.NewGuest(mode, 16<<20, 1<<20)
				if err := e.AddVM(1, g.Memory(), g.NewProtections(), 0); err != nil {
					t.Fatal(err)
				}
				cr3 := g.AllocTable()
				pd := cr3
				if mode == vasmon.Mode4 {
					pd = g.AllocTable()
					t3 := g.AllocTable()
					g.SetEntry(cr3, 0, t3|vasmon.BitP|vasmon.BitRW|vasmon.BitUS)
					g.SetEntry(t3, 0, pd|vasmon.BitP|vasmon.BitRW|vasmon.BitUS)
				}
				ta, tb := adjacentOnShards(t, e, g, 1)
				g.SetEntry(pd, 0, ta|vasmon.BitP|vasmon.BitRW|vasmon.BitUS)
				g.SetEntry(pd, 1, tb|vasmon.BitP|vasmon.BitRW|vasmon.BitUS)
				rec := vasmontest.NewRecorder()
				root, err := e.Start(context.Background(), 1, cr3, mode, monitored, rec.Callback, "r", engine.RootOptions{})
				if err != nil {
					t.Fatal(err)
				}
				m, _ := vasmontest.WalkRoot(g.Mem, root)
				esz := mode.EntryBytes()
				last := uint64(mode.Entries(1) - 1)
				e1, e2 := uint64(0x111007), uint64(0x222007)
				var w vasmon.Write
				if esz == 4 {
					// The last entry of ta and the first of tb, whole.
					w = g.Store(ta+vasmon.PageSize-4, 8, e2<<32|e1, 1)
				} else {
					// The high half of ta's last entry and the low half
					// of tb's first (both stay partial until Sync).
					w = g.Store(ta+vasmon.PageSize-4, 8, e2<<32, 1)
				}
				if w.Ver == 0 || w.Ver2 == 0 {
					t.Fatalf("store not stamped on both pages: %+v", w)
				}
				if _, err := e.Submit(1, toEvents([]vasmon.Write{w})); err != nil {
					t.Fatal(err)
				}
				if esz == 8 {
					for _, w := range []vasmon.Write{g.Store(ta+vasmon.PageSize-8, 4, e1, 2), g.Store(tb+4, 4, 0, 3)} {
						if _, err := e.Submit(1, toEvents([]vasmon.Write{w})); err != nil {
							t.Fatal(err)
						}
					}
				}
				if err := e.Sync(context.Background()); err != nil {
					t.Fatal(err)
				}
				span := uint64(mode.Entries(1)) * 4096
				evs := rec.Take("r")
				want := map[uint64]uint64{last * 4096: e1, span: e2}
				for _, ev := range evs {
					if want[ev.VA] == ev.New {
						delete(want, ev.VA)
					}
				}
				if len(want) != 0 {
					t.Fatalf("callbacks %v: missing %v", evs, want)
				}
				vasmontest.Apply(m, mode, root.Monitored, evs)
				wm, _ := vasmontest.WalkRoot(g.Mem, root)
				if d := vasmontest.Diff(wm, m, 5); d != "" {
					t.Fatal(d)
				}
				if st := checkAccounting(t, e); st.Submitted != uint64(2+2*(esz/8)) {
					t.Fatalf("%d events submitted, want %d (a crossing store counts one per page)", st.Submitted, 2+2*(esz/8))
				}
			})
		}
	}
}

// Item 2: one store unlinks a subtree and, through its second entry, links
// a table under that subtree. The table must not be hooked (an orphan,
// never unhooked, left protected after Stop), and its entries, never
// mapped, must not be reported.
func TestUnlinkAndLinkInOneStore(t *testing.T) {
	for _, shards := range []int{1, 2, 4} {
		t.Run(fmt.Sprintf("shards=%d", shards), func(t *testing.T) {
			e, err := engine.New(engine.Config{Shards: shards})
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			g := vasmontest.NewGuest(vasmon.Mode4, 16<<20, 1<<20)
			prot := g.NewProtections()
			if err := e.AddVM(1, g.Memory(), prot, 0); err != nil {
				t.Fatal(err)
			}
			fl := vasmon.BitP | vasmon.BitRW | vasmon.BitUS
			cr3 := g.AllocTable()
			q := g.AllocTable() // a PDPT; its last entry links tt (a page directory)
			tt := g.AllocTable()
			if tt != q+vasmon.PageSize {
				t.Fatal("pages not adjacent")
			}
			g.SetEntry(cr3, 0, q|fl)
			g.SetEntry(q, 511, tt|fl)
			g.SetEntry(tt, 1, 0x400000|fl|vasmon.BitPS)
			x := g.AllocTable() // a prefilled page table, to be linked in tt[0]
			g.SetEntry(x, 0, 0x7000|fl)
			rec := vasmontest.NewRecorder()
			root, err := e.Start(context.Background(), 1, cr3, vasmon.Mode4, monitored, rec.Callback, "r", engine.RootOptions{})
			if err != nil {
				t.Fatal(err)
			}
			link := x | fl
			submit := func(w vasmon.Write) {
				if _, err := e.Submit(1, toEvents([]vasmon.Write{w})); err != nil {
					t.Fatal(err)
				}
			}
			// q[511]'s low half and tt[0]'s high half first, then one
			// store writes q[511]'s high half (unlink) and tt[0]'s low
			// half (link x) at once.
			submit(g.Store(q+vasmon.PageSize-8, 4, 0, 1))
			submit(g.Store(tt+4, 4, link>>32, 2))
			submit(g.Store(q+vasmon.PageSize-4, 8, link<<32, 3))
			if err := e.Sync(context.Background()); err != nil {
				t.Fatal(err)
			}
			va := uint64(511) << 30
			for _, ev := range rec.Peek("r") {
				if ev.New == link {
					t.Fatalf("x reported mapped (it never was): %v", ev)
				}
			}
			if prot.Protected(x) || prot.Protected(tt) {
				t.Fatal("an unreachable table is protected")
			}
			if err := e.Stop(context.Background(), root); err != nil {
				t.Fatal(err)
			}
			evs := rec.Take("r")
			if len(evs) != 1 || evs[0].VA != va+2<<20 || evs[0].New != 0 {
				t.Errorf("callbacks %v, want tt's mapping removed once", evs)
			}
			if prot.Count() != 0 || e.Stats().Tables != 0 {
				t.Fatalf("after Stop: %d pages protected, %d tables", prot.Count(), e.Stats().Tables)
			}
		})
	}
}

// Item 3: a Stop whose context ends while the root's hooks are in flight
// returns the context's error and completes in the background: at the next
// quiescent point nothing of the root is hooked or protected, every
// mapping was reported removed, and the root is gone (a second Stop: unknown).
func TestStopContextEnds(t *testing.T) {
	for iter := 0; iter < 20; iter++ {
		e, err := engine.New(engine.Config{Shards: 2})
		if err != nil {
			t.Fatal(err)
		}
		v := newTestVM(t, 1, vasmon.Modes[iter%4], uint64(300+iter))
		rec := vasmontest.NewRecorder()
		startVMs(t, e, rec, []*testVM{v}, 1)
		// A context that has already ended: Stop must still complete.
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		err = e.Stop(ctx, v.roots[0])
		if err != nil && !errors.Is(err, context.Canceled) {
			t.Fatal(err)
		}
		if err := e.Stop(context.Background(), v.roots[0]); !errors.Is(err, vasmon.ErrUnknownRoot) {
			t.Fatalf("second Stop: %v", err)
		}
		if err := e.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
		vasmontest.Apply(v.maps[0], v.g.Mode, v.roots[0].Monitored, rec.Take(rootCtx{v.id, 0}))
		if len(v.maps[0]) != 0 || v.roots[0].Tables() != 0 || v.prot.Count() != 0 {
			t.Fatalf("after a cancelled Stop and Sync: %d mappings, %d tables, %d pages protected",
				len(v.maps[0]), v.roots[0].Tables(), v.prot.Count())
		}
		// Events for its pages report nothing more.
		if _, err := e.Submit(v.id, toEvents(v.w.Next())); err != nil {
			t.Fatal(err)
		}
		if err := e.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
		if evs := rec.Take(rootCtx{v.id, 0}); len(evs) != 0 {
			t.Fatalf("callbacks after Stop: %v", evs)
		}
		st := e.Stats()
		if st.Hooks != st.Unhooks {
			t.Fatalf("%d hooks, %d unhooks", st.Hooks, st.Unhooks)
		}
		e.Close()
	}
}

// Item 4: stopping a tree built from a few aliased pages (within budget,
// millions of mappings) costs bounded memory: callbacks are delivered in
// bounded chunks and buffers that grew are given back. (One shard: the whole
// unhooking runs in one step.)
func TestAliasedStopMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: a few seconds")
	}
	g := vasmontest.NewGuest(vasmon.Mode4, 16<<20, 1<<20)
	fl := vasmon.BitP | vasmon.BitRW | vasmon.BitUS
	var pages [5]uint64
	for l := 4; l >= 1; l-- {
		pages[l] = g.AllocTable()
	}
	// 4 pages: 2 x 16 x 16 tables of 512 leaves each: 8,192 level-1
	// tables (within the default budget), 4 M mappings.
	for i := 0; i < 2; i++ {
		g.SetEntry(pages[4], i, pages[3]|fl)
	}
	for i := 0; i < 16; i++ {
		g.SetEntry(pages[3], i, pages[2]|fl)
	}
	for i := 0; i < 256; i++ {
		g.SetEntry(pages[2], i, pages[1]|fl)
	}
	for i := 0; i < 512; i++ {
		g.SetEntry(pages[1], i, uint64(0x100000+i<<12)|fl)
	}
	e, err := engine.New(engine.Config{Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	prot := g.NewProtections()
	if err := e.AddVM(1, g.Memory(), prot, 0); err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int64
	cb := func(any, uint64, uint64, uint64, uint64) { calls.Add(1) }
	r, err := e.Start(context.Background(), 1, pages[4], vasmon.Mode4, monitored, cb, nil, engine.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if r.Stats().Refused != 0 {
		t.Fatalf("refused %d", r.Stats().Refused)
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	if err := e.Stop(context.Background(), r); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	alloc := after.TotalAlloc - before.TotalAlloc
	runtime.GC()
	runtime.ReadMemStats(&after)
	t.Logf("Stop: %d callbacks, %d MiB allocated, heap in use %d -> %d MiB", calls.Load(), alloc>>20, before.HeapInuse>>20, after.HeapInuse>>20)
	if want := int64(2 * 16 * 256 * 512); calls.Load() != want {
		t.Fatalf("%d removals, want %d", calls.Load(), want)
	}
	// Unbounded, the callbacks alone are 4 M x 48 bytes = 192 MiB.
	if alloc > 64<<20 {
		t.Errorf("Stop allocated %d MiB", alloc>>20)
	}
	if after.HeapInuse > before.HeapInuse+16<<20 {
		t.Errorf("heap in use grew from %d to %d MiB", before.HeapInuse>>20, after.HeapInuse>>20)
	}
}

// Item 5: a callback that calls back into the engine's waiting methods gets
// ErrReentrant instead of a hang.
func TestReentrant(t *testing.T) {
	e, err := engine.New(engine.Config{Shards: 1, QueueDepth: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	g, cr3, l1 := chainGuest()
	if err := e.AddVM(1, g.Memory(), g.NewProtections(), 0); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	errs := map[string]error{}
	var root *vasmon.Root
	var once sync.Once
	done := make(chan struct{})
	cb := func(any, uint64, uint64, uint64, uint64) {
		once.Do(func() {
			defer close(done)
			ctx := context.Background()
			mu.Lock()
			defer mu.Unlock()
			errs["Sync"] = e.Sync(ctx)
			errs["Stop"] = e.Stop(ctx, root)
			errs["RemoveVM"] = e.RemoveVM(ctx, 1)
			_, errs["Dump"] = e.Dump(ctx, root)
			errs["Close"] = e.Close()
			_, errs["Start"] = e.Start(ctx, 1, cr3+vasmon.PageSize*100, vasmon.Mode4, monitored, func(any, uint64, uint64, uint64, uint64) {}, nil, engine.RootOptions{})
			s, err := e.NewSyncer(1)
			if err == nil {
				_, errs["Syncer.Submit"] = s.SubmitOne(toEvents([]vasmon.Write{g.SetEntry(l1, 9, 0)})[0])
				s.Close()
			}
			// A blocking Submit into the full queue of this very shard.
			evs := make([]shard.Event, 64)
			for i := range evs {
				evs[i] = toEvents([]vasmon.Write{g.SetEntry(l1, 10, 0)})[0]
			}
			_, errs["Submit"] = e.Submit(1, evs)
		})
	}
	root, err = e.Start(context.Background(), 1, cr3, vasmon.Mode4, monitored, cb, nil, engine.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Submit(1, toEvents([]vasmon.Write{g.SetEntry(l1, 3, 0x3000|vasmon.BitP)})); err != nil {
		t.Fatal(err)
	}
	<-done
	mu.Lock()
	defer mu.Unlock()
	for _, m := range []string{"Sync", "Stop", "RemoveVM", "Dump", "Close", "Start", "Syncer.Submit", "Submit"} {
		if !errors.Is(errs[m], engine.ErrReentrant) {
			t.Errorf("%s from a callback: %v, want ErrReentrant", m, errs[m])
		}
	}
	// The engine still works.
	if err := e.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := e.Stop(context.Background(), root); err != nil {
		t.Fatal(err)
	}
}

// Item 6: Stats are published when Sync returns (no sleep needed); the
// "other" series never go backwards when a removed VM's slot is reused;
// and events of a removed VM still queued are never counted into the VM
// that takes its slot.
func TestBookkeeping(t *testing.T) {
	e, err := engine.New(engine.Config{Shards: 2, MaxVMLabels: 1, MaxVMs: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	reg := prometheus.NewRegistry()
	if err := e.Register(reg); err != nil {
		t.Fatal(err)
	}
	other := func() float64 {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		var n float64
		for _, mf := range mfs {
			if mf.GetName() != "vasengine_vm_events_total" {
				continue
			}
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "vm" && l.GetValue() == "other" {
						n += m.GetCounter().GetValue()
					}
				}
			}
		}
		return n
	}
	var calls atomic.Uint64
	cb := func(any, uint64, uint64, uint64, uint64) { calls.Add(1) }
	vms := map[vasmon.VMID]*testVM{}
	add := func(id vasmon.VMID) {
		v := newTestVM(t, id, vasmon.Mode4, uint64(id))
		vms[id] = v
		if err := e.AddVM(id, v.g.Memory(), v.prot, 0); err != nil {
			t.Fatal(err)
		}
		if _, err := e.Start(context.Background(), id, v.cr3(0), v.g.Mode, monitored, cb, nil, engine.RootOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	add(1)
	add(2) // slot 1: "other"
	last := 0.0
	for round := 0; round < 6; round++ {
		for _, id := range []vasmon.VMID{1, vasmon.VMID(2 + round)} {
			for k := 0; k < 50; k++ {
				if _, err := e.Submit(id, toEvents(vms[id].w.Next())); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := e.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
		st := e.Stats()
		if st.Callbacks != calls.Load() {
			t.Fatalf("round %d: Stats().Callbacks %d right after Sync, %d callbacks made", round, st.Callbacks, calls.Load())
		}
		if o := other(); o < last {
			t.Fatalf("round %d: vm=\"other\" went from %v to %v", round, last, o)
		} else {
			last = o
		}
		// Replace the VM of slot 1, with events of it still queued.
		old := vasmon.VMID(2 + round)
		for k := 0; k < 20; k++ {
			if _, err := e.Submit(old, toEvents(vms[old].w.Next())); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.RemoveVM(context.Background(), old); err != nil {
			t.Fatal(err)
		}
		for {
			err := e.AddVM(old+1, vasmontest.NewGuest(vasmon.Mode4, 1<<20, 0).Memory(), vasmontest.NewProtections(), 0)
			if err == nil {
				break
			}
			if !errors.Is(err, engine.ErrSlotBusy) {
				t.Fatal(err)
			}
			runtime.Gosched() // the removed VM's events are still being processed
		}
		if err := e.RemoveVM(context.Background(), old+1); err != nil {
			t.Fatal(err)
		}
		if err := e.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
		for _, v := range e.Stats().PerVM {
			if v.ID == old+1 && v.Events() != 0 {
				t.Fatalf("VM %d, new in its slot, counts %d events of the VM before it", v.ID, v.Events())
			}
		}
		add(old + 1)
	}
}

// Fair ingest (issue 19): while one VM floods a shard's queue, another VM
// within its share is never refused (non-blocking mode) and never waits.
func TestFairIngest(t *testing.T) {
	e, err := engine.New(engine.Config{Shards: 1, QueueDepth: 64, NonBlocking: true})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	block, entered := make(chan struct{}), make(chan struct{})
	var once sync.Once
	cb := func(any, uint64, uint64, uint64, uint64) { once.Do(func() { close(entered); <-block }) }
	var gs [3]*vasmontest.Guest
	var l1s [3]uint64
	for id := 1; id <= 2; id++ {
		g, cr3, l1 := chainGuest()
		gs[id], l1s[id] = g, l1
		if err := e.AddVM(vasmon.VMID(id), g.Memory(), g.NewProtections(), 0); err != nil {
			t.Fatal(err)
		}
		if _, err := e.Start(context.Background(), vasmon.VMID(id), cr3, vasmon.Mode4, monitored, cb, nil, engine.RootOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// VM 1's first event blocks the worker in its callback.
	if _, err := e.Submit(1, toEvents([]vasmon.Write{gs[1].SetEntry(l1s[1], 0, 0x5000|vasmon.BitP)})); err != nil {
		t.Fatal(err)
	}
	<-entered
	// VM 1 floods until refused.
	flood := 0
	for {
		_, err := e.Submit(1, toEvents([]vasmon.Write{gs[1].SetEntry(l1s[1], 1+flood%8, uint64(flood)<<12)}))
		if errors.Is(err, engine.ErrOverload) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		flood++
	}
	// VM 2 gets its share: 64 / (2 x 2 VMs) = 16 events.
	for k := 0; k < 16; k++ {
		if _, err := e.Submit(2, toEvents([]vasmon.Write{gs[2].SetEntry(l1s[2], k, uint64(k+1)<<12)})); err != nil {
			t.Fatalf("VM 2's event %d within its share refused: %v (VM 1 queued %d)", k, err, flood)
		}
	}
	close(block)
	if err := e.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	checkAccounting(t, e)
	if flood > 48 {
		t.Fatalf("the flooding VM queued %d events, more than half the queue plus its share", flood)
	}
}
