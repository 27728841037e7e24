// Package bench holds the benchmark suites of the engine and their
// baselines, and (in cmd) the report generator behind `make bench-report`.
//
// A Workload is a steady-state event stream over simulated 4-level guests:
// every leaf entry of LeafTables level-1 tables per VM is written twice, the
// first time flipping a bit and the second time flipping it back, so the
// stream can be replayed forever and stays consistent with the shadows. Half
// the flips are of RW (relevant: a callback), half of A (irrelevant), in a
// random order. A replay makes each store in guest memory, stamped on the
// page's version word, before it submits it, as a backend does (one producer
// per VM, so each guest's stores stay in order). Workloads are built once;
// the events are read-only afterwards.
package bench

import (
	"context"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// Workload is a replayable event stream; see the package comment.
type Workload struct {
	Guests []*vasmontest.Guest
	Roots  []uint64
	Events [][]shard.Event // per VM (VM IDs are index+1)
	Tables int             // tables per full tree walk, all VMs
}

// Monitored are the bits the workload's roots report.
const Monitored = vasmon.BitRW | vasmon.BitUS | vasmon.BitNX

// NewWorkload builds vms guests with leafTables level-1 tables each.
func NewWorkload(vms, leafTables int, seed uint64) *Workload {
	w := &Workload{}
	rng := rand.New(rand.NewPCG(seed, 1))
	m := vasmon.Mode4
	for v := 0; v < vms; v++ {
		g := vasmontest.NewGuest(m, 1<<34, 1<<20)
		root := g.AllocTable()
		type slot struct{ gpa, val uint64 }
		var slots []slot
		for t := 0; t < leafTables; t++ {
			g.Map(root, uint64(t)<<21, 1, 0x40000000, vasmon.BitRW|vasmon.BitUS)
			l3 := m.TableAddr(g.Entry(root, 0))
			l2 := m.TableAddr(g.Entry(l3, t>>9))
			l1 := m.TableAddr(g.Entry(l2, t&511))
			for i := 0; i < 512; i++ {
				val := uint64(0x40000000+uint64(t*512+i)<<12) | vasmon.BitP | vasmon.BitRW | vasmon.BitUS
				g.SetEntry(l1, i, val)
				slots = append(slots, slot{l1 + uint64(8*i), val})
			}
		}
		w.Tables += leafTables + 2 + leafTables/512
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
		w.Guests = append(w.Guests, g)
		w.Roots = append(w.Roots, root)
		w.Events = append(w.Events, evs)
	}
	return w
}

// NewHookWorkload builds vms guests whose events link and unlink tables:
// links entries of one page directory per VM each link a page table of
// their own, prefilled with 8 mappings, then unlink it (every link in a
// random order, then every unlink), so every event hooks or unhooks a table
// and reports 8 callbacks. The stream can be replayed forever.
func NewHookWorkload(vms, links int, seed uint64) *Workload {
	w := &Workload{}
	rng := rand.New(rand.NewPCG(seed, 2))
	m := vasmon.Mode4
	fl := vasmon.BitP | vasmon.BitRW | vasmon.BitUS
	for v := 0; v < vms; v++ {
		g := vasmontest.NewGuest(m, 1<<30, 1<<20)
		root := g.AllocTable()
		l3, l2 := g.AllocTable(), g.AllocTable()
		g.SetEntry(root, 0, l3|fl)
		g.SetEntry(l3, 0, l2|fl)
		var gpas, vals []uint64
		for i := 0; i < links; i++ {
			l1 := g.AllocTable()
			for k := 0; k < 8; k++ {
				g.SetEntry(l1, 64*k, uint64(0x40000000+uint64(i*8+k)<<12)|fl)
			}
			gpas = append(gpas, l2+uint64(8*i))
			vals = append(vals, l1|fl)
		}
		w.Tables += 3
		evs := make([]shard.Event, 0, 2*links)
		for pass := 0; pass < 2; pass++ {
			for _, i := range rng.Perm(links) {
				old, nw := uint64(0), vals[i]
				if pass == 1 {
					old, nw = nw, 0
				}
				evs = append(evs, shard.Event{GPA: gpas[i], Data: nw, Old: old, HasOld: true, Size: 8})
			}
		}
		w.Guests = append(w.Guests, g)
		w.Roots = append(w.Roots, root)
		w.Events = append(w.Events, evs)
	}
	return w
}

// Nop is a callback that does nothing.
func Nop(any, uint64, uint64, uint64, uint64) {}

// Start registers the workload's VMs with e and starts their roots with cb.
func (w *Workload) Start(e *engine.Engine, cb vasmon.Callback) error {
	for i, g := range w.Guests {
		if err := e.AddVM(vasmon.VMID(i+1), g.Memory(), g.NewProtections(), 0); err != nil {
			return err
		}
		if _, err := e.Start(context.Background(), vasmon.VMID(i+1), w.Roots[i], vasmon.Mode4, Monitored, cb, nil, engine.RootOptions{}); err != nil {
			return err
		}
	}
	return nil
}

// Submitter takes one batch of a VM's events.
type Submitter func(vm vasmon.VMID, evs []shard.Event)

// Drive submits n events (rounded down to a multiple of the VM count) from
// one producer goroutine per VM, in batches of up to batch events, and
// returns the number submitted once all producers are done.
func (w *Workload) Drive(submit Submitter, n, batch int) int {
	var wg sync.WaitGroup
	per := n / len(w.Events)
	for v := range w.Events {
		wg.Add(1)
		go func() {
			defer wg.Done()
			evs := w.Events[v]
			buf := make([]shard.Event, batch)
			left, at := per, 0
			for left > 0 {
				k := min(batch, left, len(evs)-at)
				w.Store(v, buf[:k], evs[at:at+k])
				submit(vasmon.VMID(v+1), buf[:k])
				left -= k
				at = (at + k) % len(evs)
			}
		}()
	}
	wg.Wait()
	return per * len(w.Events)
}

// Store makes the stores of evs in guest v's memory, stamped on their
// pages' version words, and copies the stamped events into dst.
func (w *Workload) Store(v int, dst, evs []shard.Event) {
	g := w.Guests[v]
	for i := range evs {
		ev := evs[i]
		ev.Ver, ev.Stamped = g.Ver.BeginWrite(ev.GPA), true
		_, _ = g.Mem.WriteUint(ev.GPA, int(ev.Size), ev.Data)
		g.Ver.EndWrite(ev.GPA)
		dst[i] = ev
	}
}

// Pacing is what Paced did: events sent, and how late its batches were
// against their schedule (a late batch means the producers did not get a
// CPU in time, not that the engine was slow).
type Pacing struct {
	Sent   int
	LagP99 time.Duration // 99th percentile of (submit time - due time) over batches
	Late   float64       // fraction of batches submitted more than 50 us late
}

// Paced submits events at rate events/s in total for d, open loop, in
// batches of batch events, from one goroutine that takes the VMs in turn
// (one pacer keeps the schedule on a machine with few cores, where several
// spinning producers would crowd out the workers). Each event's trap is
// stamped by the engine when Submit receives it (Trap 0), as a backend
// stamps a trap when it happens: the latency measured is the engine's,
// including any wait in a full queue. The pacer's own lateness is reported
// apart.
func (w *Workload) Paced(submit Submitter, rate float64, d time.Duration, batch int) Pacing {
	buf := make([]shard.Event, batch)
	at := make([]int, len(w.Events))
	var lags []time.Duration
	interval := float64(batch) / rate // seconds per batch
	sent := 0
	start := time.Now()
	for k := 0; ; k++ {
		due := time.Duration(float64(k) * interval * 1e9)
		if due >= d {
			break
		}
		// Sleep while the due time is far (timers are coarse: a sleep may
		// last a millisecond more than asked), then poll until it comes.
		for {
			wait := due - time.Since(start)
			if wait <= 0 {
				break
			}
			if wait > 3*time.Millisecond {
				time.Sleep(wait - 2*time.Millisecond)
			}
		}
		v := k % len(w.Events)
		evs := w.Events[v]
		for i := range buf {
			w.Store(v, buf[i:i+1], evs[at[v]:at[v]+1])
			buf[i].Trap = 0
			at[v] = (at[v] + 1) % len(evs)
		}
		lags = append(lags, time.Since(start)-due)
		submit(vasmon.VMID(v+1), buf)
		sent += batch
	}
	p := Pacing{Sent: sent}
	if len(lags) > 0 {
		slices.Sort(lags)
		p.LagP99 = lags[len(lags)*99/100]
		late := 0
		for _, l := range lags {
			if l > 50*time.Microsecond {
				late++
			}
		}
		p.Late = float64(late) / float64(len(lags))
	}
	return p
}

// WaitProcessed spins until e's shards have processed n events in all; it
// allocates nothing.
func WaitProcessed(e *engine.Engine, n uint64) {
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

// Naive is the baseline a newcomer would write: a channel send per event to
// one goroutine that applies it to a mutex-protected map of tables.
type Naive struct {
	mu     sync.Mutex
	tables map[[2]uint64]*[512]uint64
	ch     chan shard.Event
	done   atomic.Uint64
	cb     vasmon.Callback
}

// NewNaive builds the naive engine's tables for w and starts its goroutine.
func NewNaive(w *Workload, cb vasmon.Callback) *Naive {
	n := &Naive{tables: map[[2]uint64]*[512]uint64{}, ch: make(chan shard.Event, 1<<14), cb: cb}
	for v, evs := range w.Events {
		for _, ev := range evs {
			k := [2]uint64{uint64(v + 1), ev.GPA >> 12}
			if n.tables[k] == nil {
				n.tables[k] = new([512]uint64)
			}
			n.tables[k][(ev.GPA&0xFFF)/8] = ev.Old
		}
	}
	go n.run()
	return n
}

func (n *Naive) run() {
	for ev := range n.ch {
		n.mu.Lock()
		if t := n.tables[[2]uint64{uint64(ev.Slot), ev.GPA >> 12}]; t != nil {
			i := (ev.GPA & 0xFFF) / 8
			old := t[i]
			t[i] = ev.Data
			if (old^ev.Data)&(vasmon.BitP|Monitored) != 0 {
				n.cb(nil, ev.GPA, old, ev.Data, 4096)
			}
		}
		n.mu.Unlock()
		n.done.Add(1)
	}
}

// Submit sends each event on the channel.
func (n *Naive) Submit(vm vasmon.VMID, evs []shard.Event) {
	for _, ev := range evs {
		ev.Slot = uint16(vm)
		n.ch <- ev
	}
}

// Wait spins until total events were applied.
func (n *Naive) Wait(total uint64) {
	for n.done.Load() < total {
		runtime.Gosched()
	}
}

// Close stops the naive engine's goroutine.
func (n *Naive) Close() { close(n.ch) }

// Locked is the HVMI-style baseline: the single-threaded vasmon.Monitor
// under one global lock, called synchronously by every producer (as HVMI's
// EPT violation handler runs on the trapping vCPU under the introspection
// lock).
type Locked struct {
	mu  sync.Mutex
	Mon *vasmon.Monitor
}

// NewLocked starts the workload's roots on a fresh monitor.
func NewLocked(w *Workload, cb vasmon.Callback) (*Locked, error) {
	l := &Locked{Mon: vasmon.NewMonitor()}
	for i, g := range w.Guests {
		if err := l.Mon.AddVM(vasmon.VMID(i+1), g.Mem, vasmontest.NewProtections(), 0); err != nil {
			return nil, err
		}
		if _, err := l.Mon.Start(vasmon.VMID(i+1), w.Roots[i], vasmon.Mode4, Monitored, cb, nil, vasmon.Options{}); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// Submit applies each event under the lock.
func (l *Locked) Submit(vm vasmon.VMID, evs []shard.Event) {
	l.mu.Lock()
	for i := range evs {
		ev := &evs[i]
		l.Mon.Write(vm, vasmon.Write{GPA: ev.GPA, Data: ev.Data, Old: ev.Old, HasOld: ev.HasOld, Size: ev.Size})
	}
	l.mu.Unlock()
}

// MemoryFloor is the physical floor of w: one random read-modify-write per
// event into a working set as large as the shadows of w's tables, n events
// in all on as many goroutines as there are CPUs. It returns events/s.
func (w *Workload) MemoryFloor(n int) float64 {
	ws := make([]uint64, w.Tables*512)
	var idx []uint32
	for _, evs := range w.Events {
		for _, ev := range evs {
			idx = append(idx, uint32((ev.GPA/8*2654435761)%uint64(len(ws))))
		}
	}
	procs := runtime.GOMAXPROCS(0)
	start := time.Now()
	var wg sync.WaitGroup
	for p := 0; p < procs; p++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			at := p * len(idx) / procs
			for k := 0; k < n/procs; k++ {
				ws[idx[at]] ^= uint64(k)
				if at++; at == len(idx) {
					at = 0
				}
			}
		}()
	}
	wg.Wait()
	return float64(n/procs*procs) / time.Since(start).Seconds()
}
