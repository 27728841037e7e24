package engine_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// workload is a steady-state event stream over VMs whose roots map leafTables
// level-1 tables each. Every entry is written twice, first to flip a bit and
// later to flip it back, so the stream can be replayed forever and stays
// consistent with guest memory. Half the flips are of RW (relevant: a
// callback), half of A (irrelevant).
type workload struct {
	guests []*vasmontest.Guest
	roots  []uint64
	events [][]shard.Event // per VM
	tables int
}

func newWorkload(vms, leafTables int, seed uint64) *workload {
	w := &workload{}
	rng := rand.New(rand.NewPCG(seed, 1))
	for v := 0; v < vms; v++ {
		g := vasmontest.NewGuest(vasmon.Mode4, 1<<34, 1<<20)
		root := g.AllocTable()
		type slot struct{ gpa, val uint64 }
		var slots []slot
		for t := 0; t < leafTables; t++ {
			va := uint64(t) << 21
			g.Map(root, va, 1, 0x40000000, vasmon.BitRW|vasmon.BitUS)
			tbl := vasmon.Mode4.TableAddr(g.Entry(vasmon.Mode4.TableAddr(g.Entry(vasmon.Mode4.TableAddr(g.Entry(root, 0)), 0)), t))
			for i := 0; i < 512; i++ {
				val := uint64(0x40000000+uint64(t*512+i)<<12) | vasmon.BitP | vasmon.BitRW | vasmon.BitUS
				g.SetEntry(tbl, i, val)
				slots = append(slots, slot{tbl + uint64(8*i), val})
			}
		}
		w.tables += leafTables + 2
		evs := make([]shard.Event, 0, 2*len(slots))
		for pass := 0; pass < 2; pass++ {
			for _, k := range rng.Perm(len(slots)) {
				s := slots[k]
				bit := vasmon.BitRW
				if k%2 == 1 {
					bit = vasmon.BitA
				}
				old, nw := s.val, s.val^bit
				if pass == 1 {
					old, nw = nw, old
				}
				evs = append(evs, shard.Event{GPA: s.gpa, Data: nw, Old: old, HasOld: true, Size: 8})
			}
		}
		w.guests = append(w.guests, g)
		w.roots = append(w.roots, root)
		w.events = append(w.events, evs)
	}
	return w
}

var (
	benchOnce sync.Once
	benchWL   *workload
)

func benchWorkload() *workload {
	benchOnce.Do(func() { benchWL = newWorkload(4, 128, 7) })
	return benchWL
}

func nop(any, uint64, uint64, uint64, uint64) {}

func startWorkload(tb testing.TB, e *engine.Engine, w *workload) {
	for i, g := range w.guests {
		if err := e.AddVM(vasmon.VMID(i+1), g.Mem, vasmontest.NewProtections(), 0); err != nil {
			tb.Fatal(err)
		}
		if _, err := e.Start(context.Background(), vasmon.VMID(i+1), w.roots[i], vasmon.Mode4, vasmon.BitRW|vasmon.BitUS|vasmon.BitNX, nop, nil, engine.RootOptions{}); err != nil {
			tb.Fatal(err)
		}
	}
}

// drive submits n events of w from one producer goroutine per VM, in
// batches of 256, and returns when all are submitted.
func drive(tb testing.TB, submit func(vm vasmon.VMID, evs []shard.Event), w *workload, n int) {
	var wg sync.WaitGroup
	per := n / len(w.events)
	for v := range w.events {
		wg.Add(1)
		go func() {
			defer wg.Done()
			evs := w.events[v]
			left, at := per, 0
			for left > 0 {
				k := min(256, left, len(evs)-at)
				submit(vasmon.VMID(v+1), evs[at:at+k])
				left -= k
				at = (at + k) % len(evs)
			}
		}()
	}
	wg.Wait()
}

// waitProcessed spins until the engine's shards processed n events; it
// allocates nothing.
func waitProcessed(e *engine.Engine, n uint64) {
	for {
		var p uint64
		for _, s := range e.Shards() {
			p += s.C.Processed.Load()
		}
		if p >= n {
			return
		}
		runtime.Gosched()
	}
}

// BenchmarkEngine: events/s through the sharded engine with producers on
// other goroutines (one per VM), p99 trap-to-callback latency under this
// saturating closed-loop load, and allocations per event.
func BenchmarkEngine(b *testing.B) {
	w := benchWorkload()
	for _, shards := range []int{1, 2} {
		b.Run(fmt.Sprintf("shards=%d", shards), func(b *testing.B) {
			e, err := engine.New(engine.Config{Shards: shards, QueueDepth: 1 << 14})
			if err != nil {
				b.Fatal(err)
			}
			defer e.Close()
			startWorkload(b, e, w)
			// Warm up: every table hooked, arenas and queues at size.
			drive(b, func(vm vasmon.VMID, evs []shard.Event) { e.Submit(vm, evs) }, w, 1<<18)
			waitProcessed(e, 1<<18)
			base := e.Stats()
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			drive(b, func(vm vasmon.VMID, evs []shard.Event) { e.Submit(vm, evs) }, w, b.N)
			n := uint64(b.N / len(w.events) * len(w.events))
			waitProcessed(e, base.Processed+n)
			el := time.Since(start)
			b.StopTimer()
			st := e.Stats()
			b.ReportMetric(float64(n)/el.Seconds(), "events/s")
			b.ReportMetric(float64(st.Latency.Quantile(0.99)), "p99-ns")
		})
	}
}

// naiveEngine is the baseline a newcomer would write: a channel send per
// event to one goroutine that applies it to a mutex-protected map of tables.
type naiveEngine struct {
	mu     sync.Mutex
	tables map[[2]uint64]*[512]uint64
	ch     chan shard.Event
	done   atomic.Uint64
	cb     vasmon.Callback
}

func (n *naiveEngine) run() {
	for ev := range n.ch {
		n.mu.Lock()
		if t := n.tables[[2]uint64{uint64(ev.VM), ev.GPA >> 12}]; t != nil {
			i := (ev.GPA & 0xFFF) / 8
			old := t[i]
			t[i] = ev.Data
			if (old^ev.Data)&(vasmon.BitP|vasmon.BitRW|vasmon.BitUS|vasmon.BitNX) != 0 {
				n.cb(nil, ev.GPA, old, ev.Data, 4096)
			}
		}
		n.mu.Unlock()
		n.done.Add(1)
	}
}

// BenchmarkNaiveEngine runs BenchmarkEngine's workload through naiveEngine.
func BenchmarkNaiveEngine(b *testing.B) {
	w := benchWorkload()
	n := &naiveEngine{tables: map[[2]uint64]*[512]uint64{}, ch: make(chan shard.Event, 1<<14), cb: nop}
	for v, evs := range w.events {
		for _, ev := range evs {
			k := [2]uint64{uint64(v + 1), ev.GPA >> 12}
			if n.tables[k] == nil {
				n.tables[k] = new([512]uint64)
			}
			n.tables[k][(ev.GPA&0xFFF)/8] = ev.Old
		}
	}
	go n.run()
	defer close(n.ch)
	submit := func(vm vasmon.VMID, evs []shard.Event) {
		for _, ev := range evs {
			ev.VM = uint32(vm)
			n.ch <- ev
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	drive(b, submit, w, b.N)
	total := uint64(b.N / len(w.events) * len(w.events))
	for n.done.Load() < total {
		runtime.Gosched()
	}
	b.ReportMetric(float64(total)/time.Since(start).Seconds(), "events/s")
}

// BenchmarkMemoryLimit is the physical floor of the workload: one random
// read-modify-write per event into a working set as large as the shadows
// of the workload's tables, on as many goroutines as there are CPUs.
func BenchmarkMemoryLimit(b *testing.B) {
	w := benchWorkload()
	ws := make([]uint64, w.tables*512)
	var idx []uint32
	for _, evs := range w.events {
		for _, ev := range evs {
			idx = append(idx, uint32((ev.GPA/8*2654435761)%uint64(len(ws))))
		}
	}
	procs := runtime.GOMAXPROCS(0)
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for p := 0; p < procs; p++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			at := p * len(idx) / procs
			for k := 0; k < b.N/procs; k++ {
				ws[idx[at]] ^= uint64(k)
				at++
				if at == len(idx) {
					at = 0
				}
			}
		}()
	}
	wg.Wait()
	b.ReportMetric(float64(b.N/procs*procs)/time.Since(start).Seconds(), "events/s")
}

// TestEngineSteadyStateAllocs: submitting and processing a batch of leaf
// writes (with callbacks) allocates nothing once warmed up.
func TestEngineSteadyStateAllocs(t *testing.T) {
	w := newWorkload(2, 8, 3)
	e, err := engine.New(engine.Config{Shards: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	startWorkload(t, e, w)
	var done uint64
	run := func() {
		for v, evs := range w.events {
			for at := 0; at < len(evs); at += 256 {
				if _, err := e.Submit(vasmon.VMID(v+1), evs[at:min(at+256, len(evs))]); err != nil {
					t.Fatal(err)
				}
				done += uint64(min(256, len(evs)-at))
			}
		}
		waitProcessed(e, done)
	}
	run()
	run()
	if a := testing.AllocsPerRun(5, run); a != 0 {
		t.Fatalf("%v allocations per %d events", a, done/7)
	}
	if e.Stats().Callbacks == 0 {
		t.Fatal("workload produced no callbacks")
	}
}
