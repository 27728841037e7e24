package vasmon_test

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"testing"
	"time"

	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// Hostile guests (SEMANTICS.md section 5): the monitor must bound its host
// memory and time whatever the guest writes, count what it skips, and
// clean up completely.

// aliasBomb makes every user entry of the root point to one page of the
// next level, every entry of which points to one page of the level below,
// down to one level-1 page full of leaves: a few pages that look like
// 256 * 512^(levels-2) tables. With leafy, the pages between the root and
// level 2 link through their first entry only, so that most tables under
// the budget are level-1 tables full of leaves. It returns the root and the
// page of each level (index = level).
func (h *harness) aliasBomb(leafy bool) (uint64, []uint64) {
	m := h.mode
	top := m.Levels()
	pages := make([]uint64, top+1)
	for l := top; l >= 1; l-- {
		pages[l] = h.table()
	}
	for l := top; l >= 1; l-- {
		n := m.Entries(l)
		if l == top {
			n = m.UserEntries()
		} else if leafy && l > 2 {
			n = 1
		}
		for i := 0; i < n; i++ {
			if l == 1 {
				h.g.SetEntry(pages[1], i, h.leaf(uint64(i)<<12, 1))
			} else {
				h.g.SetEntry(pages[l], i, h.link(pages[l-1], l))
			}
		}
	}
	return pages[top], pages
}

// bombTables returns how many tables the alias bomb looks like.
func bombTables(m vasmon.Mode, leafy bool) float64 {
	n, level := 1.0, 1.0
	for l := m.Levels(); l > 1; l-- {
		e := float64(m.Entries(l))
		if l == m.Levels() {
			e = float64(m.UserEntries())
		} else if leafy && l > 2 {
			e = 1
		}
		level *= e
		n += level
	}
	return n
}

// heapDelta runs f and returns the bytes it allocated.
func heapDelta(f func()) uint64 {
	var a, b runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&a)
	f()
	runtime.ReadMemStats(&b)
	return b.TotalAlloc - a.TotalAlloc
}

// checkRefusal checks the refusal counters of a root that hit a budget.
func checkRefusal(t *testing.T, h *harness, r *vasmon.Root, pages []uint64) {
	t.Helper()
	st := r.Stats()
	if st.Refused == 0 {
		t.Fatalf("budget not reported: %+v", st)
	}
	l := st.LastRefusedLevel
	if l < 1 || l >= h.mode.Levels() || st.LastRefusedGPA != pages[l] {
		t.Fatalf("last refusal: level %d gpa %#x; bomb pages %#x", l, st.LastRefusedGPA, pages)
	}
	if span := uint64(h.mode.Entries(l)) << h.mode.Shift(l); st.LastRefusedVA&(span-1) != 0 {
		t.Fatalf("last refused VA %#x is not the start of a level-%d table", st.LastRefusedVA, l)
	}
}

// TestHostileAliasBomb: the bomb stops at the root's or the VM's table
// budget, is reported, costs host memory in proportion to the budget (not
// to the guest's claim) and little time, and Stop cleans everything.
func TestHostileAliasBomb(t *testing.T) {
	type budget struct {
		name       string
		root, vm   int64
		slow       bool
		maxHeap    uint64 // bytes allocated by Start
		maxHost    uintptr
		maxSeconds float64
	}
	budgets := []budget{
		{name: "root2000", root: 2000, maxHeap: 8 << 20, maxHost: 2000*300 + 20*vasmon.PageSize, maxSeconds: 2},
		{name: "vm1500", vm: 1500, maxHeap: 8 << 20, maxHost: 1500*300 + 20*vasmon.PageSize, maxSeconds: 2},
		// The default budgets: 65536 tables per root (4-level only: the
		// code paths are the same in every mode).
		{name: "default", slow: true, maxHeap: 64 << 20, maxHost: vasmon.DefaultRootTables*300 + 20*vasmon.PageSize, maxSeconds: 20},
	}
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		for _, leafy := range []bool{false, true} {
			if leafy && mode.Levels() < 4 {
				continue // the same bomb
			}
			for _, b := range budgets {
				t.Run(fmt.Sprintf("leafy=%v/%s", leafy, b.name), func(t *testing.T) {
					bombRun(t, mode, leafy, b.root, b.vm, b.slow, b.maxHeap, b.maxHost, b.maxSeconds)
				})
			}
		}
	})
}

func bombRun(t *testing.T, mode vasmon.Mode, leafy bool, rootBudget, vmBudget int64, slow bool, maxHeap uint64, maxHost uintptr, maxSeconds float64) {
	if slow && (testing.Short() || mode != vasmon.Mode4) {
		t.Skip("slow")
	}
	// Budgets at most half the bomb, so that small bombs
	// (32-bit, PAE) overflow them too.
	total := bombTables(mode, leafy)
	if rootBudget > 0 {
		rootBudget = min(rootBudget, int64(total/2))
	}
	if vmBudget > 0 {
		vmBudget = min(vmBudget, int64(total/2))
	}
	limit := rootBudget
	if vmBudget > 0 {
		limit = vmBudget
	}
	if limit == 0 {
		limit = vasmon.DefaultRootTables
	}
	if total <= float64(limit) {
		t.Skipf("a %v bomb (%.0f tables) fits the budget", mode, total)
	}
	h := &harness{t: t, mode: mode, g: vasmontest.NewGuest(mode, hRAM, hBase),
		prot: vasmontest.NewProtections(), mon: vasmon.NewMonitor(), rec: vasmontest.NewRecorder()}
	if err := h.mon.AddVM(1, h.g.Mem, h.prot, vmBudget); err != nil {
		t.Fatal(err)
	}
	cr3, pages := h.aliasBomb(leafy)
	var r *vasmon.Root
	var err error
	calls := 0
	cb := func(any, uint64, uint64, uint64, uint64) { calls++ }
	t0 := time.Now()
	heap := heapDelta(func() {
		r, err = h.mon.Start(1, cr3, mode, monAll, cb, nil, vasmon.Options{MaxTables: rootBudget})
	})
	took := time.Since(t0)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	host := h.mon.Store().HostBytes()
	vm := h.mon.VM(1)
	t.Logf("Start: %v, %d tables, refused %d, %d KiB allocated, HostBytes %d", took, r.Tables(), r.Stats().Refused, heap>>10, host)
	if r.Tables() != limit || vm.Tables() != limit {
		t.Fatalf("hooked %d tables (VM counts %d), want the budget %d", r.Tables(), vm.Tables(), limit)
	}
	checkRefusal(t, h, r, pages)
	if vmBudget > 0 && vm.Refused() == 0 {
		t.Fatal("VM refusals not counted")
	}
	if host > maxHost {
		t.Fatalf("HostBytes %d > %d for %d tables", host, maxHost, limit)
	}
	if heap > maxHeap {
		t.Fatalf("Start allocated %d bytes for %d tables (limit %d)", heap, limit, maxHeap)
	}
	if took.Seconds() > maxSeconds {
		t.Fatalf("Start took %v", took)
	}
	if calls != 0 {
		t.Fatalf("Start reported %d callbacks", calls)
	}
	// One page per level reached, whatever the number of tables.
	levels := map[int]bool{}
	for _, ti := range h.mon.Dump(r) {
		levels[ti.Level] = true
	}
	if st := h.mon.Store().Stats(); st.Pages != len(levels) || int64(st.Tables) != limit {
		t.Fatalf("store: %d pages, %d tables; levels reached %v", st.Pages, st.Tables, levels)
	}

	// Another root of the VM: with the VM budget spent, Start
	// fails cleanly.
	if vmBudget > 0 {
		other := h.table()
		protects := h.prot.Protects
		if _, err := h.mon.Start(1, other, mode, monAll, cb, nil, vasmon.Options{}); !errors.Is(err, vasmon.ErrBudget) {
			t.Fatalf("Start past the VM budget: %v", err)
		}
		if h.prot.Protects != protects || vm.Tables() != limit || h.mon.Root(1, other) != nil {
			t.Fatal("refused Start left state behind")
		}
	}

	// Writes into the bomb, at the lowest level hooked: the first
	// entry of its page changes (a 4 KiB page's frame, or a table
	// becoming a large page) and back, reported once per table
	// on the page; links are refused (the budget is spent).
	low, nlow, nl1 := mode.Levels(), 0, 0
	for _, ti := range h.mon.Dump(r) {
		if ti.Level < low {
			low, nlow = ti.Level, 0
		}
		if ti.Level == low {
			nlow++
		}
	}
	if low == 1 {
		nl1 = nlow
	}
	if low == 1 || mode.LargeOK(low) {
		old := h.g.Entry(pages[low], 0)
		v := h.leaf(0x40000000, low)
		t0 = time.Now()
		heap = heapDelta(func() {
			h.write(h.g.SetEntry(pages[low], 0, v))
			h.write(h.g.SetEntry(pages[low], 0, old))
		})
		if calls != 2*nlow {
			t.Fatalf("%d callbacks for %d level-%d tables", calls, nlow, low)
		}
		if r.Tables() != limit || vm.Tables() != limit {
			t.Fatalf("after writes: %d tables (VM %d), want %d", r.Tables(), vm.Tables(), limit)
		}
		if heap > maxHeap || time.Since(t0).Seconds() > maxSeconds {
			t.Fatalf("two writes allocated %d bytes in %v", heap, time.Since(t0))
		}
	}

	calls = 0
	t0 = time.Now()
	heap = heapDelta(func() {
		if err := h.mon.Stop(r); err != nil {
			t.Fatal(err)
		}
	})
	t.Logf("Stop: %v, %d KiB allocated", time.Since(t0), heap>>10)
	if heap > maxHeap || time.Since(t0).Seconds() > maxSeconds {
		t.Fatalf("Stop allocated %d bytes in %v", heap, time.Since(t0))
	}
	// Every hooked level-1 table reports all its entries removed.
	if calls != nl1*mode.Entries(1) {
		t.Fatalf("Stop reported %d removals for %d level-1 tables", calls, nl1)
	}
	st := h.mon.Store().Stats()
	// Unhook requests went only to tables that were hooked: none of the
	// links the budget refused cost a request.
	if st.UnhookMisses != 0 {
		t.Fatalf("Stop sent %d unhook requests to tables never hooked (%d hooked)", st.UnhookMisses, limit)
	}
	if h.prot.Count() != 0 || st.Tables != 0 || st.Pages != 0 || r.Tables() != 0 || vm.Tables() != 0 || len(h.prot.Errors) != 0 {
		t.Fatalf("after Stop: %d pages protected, store %+v, root %d, VM %d tables, errors %v",
			h.prot.Count(), st, r.Tables(), vm.Tables(), h.prot.Errors)
	}
}

// TestHostileAliasFan: many aliases that fit the budget are all hooked and
// reported (the oracle holds), and share one shadow page each.
func TestHostileAliasFan(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		cr3 := h.table()
		// One level-2 table whose every entry links the same level-1 page.
		t2 := h.path(cr3, 0x40000000, 2, false)
		l1 := h.table()
		for i := 0; i < mode.Entries(1); i++ {
			h.g.SetEntry(l1, i, h.leaf(uint64(i)<<12, 1))
		}
		r := h.start(cr3, monAll, vasmon.Options{})
		const fan = 64
		first := h.idx(0x40000000, 2)
		for i := first; i < first+fan; i++ {
			h.write(h.g.SetEntry(t2, i, h.link(l1, 2)))
		}
		got := h.rec.Take(r)
		if len(got) != fan*mode.Entries(1) {
			t.Fatalf("%d callbacks for %d aliases of %d leaves", len(got), fan, mode.Entries(1))
		}
		r.apply(got)
		h.verify()
		if host, n := h.mon.Store().HostBytes(), r.Tables(); host > uintptr(n)*300+26*vasmon.PageSize {
			t.Fatalf("HostBytes %d for %d tables on %d pages", host, n, h.mon.Store().Stats().Pages)
		}
		// One write to the shared page reaches every alias.
		e := h.leaf(0xABC000, 1)
		h.write(h.g.SetEntry(l1, 1, e))
		if evs := h.rec.Peek(r); len(evs) != fan {
			t.Fatalf("%d callbacks for %d aliases", len(evs), fan)
		}
		r.expectSet(h.rec.Peek(r)...)
		r.stop()
	})
}

// TestHostileOutOfRAM: entries pointing outside guest RAM (above its end,
// above 4 GiB, at the highest frame) at every level are skipped and
// counted, never hooked, and do not disturb the oracle.
func TestHostileOutOfRAM(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		cr3 := h.table()
		bad := []uint64{hRAM, hRAM + 0x5000, 0xFFFFF000}
		if mode.EntryBytes() == 8 {
			bad = append(bad, 1<<32, 0x000FFFFFFFFFF000, 1<<50)
		}
		// Pre-filled bad links at every level of the path to vaX.
		n := 0
		for l := mode.Levels(); l >= 2; l-- {
			t := h.path(cr3, vaX, l, false)
			for k, b := range bad {
				i := h.idx(vaX, l) + 1 + k
				if l == mode.Levels() && mode == vasmon.ModePAE {
					if k > 0 {
						break
					}
					i = 0
				}
				h.g.SetEntry(t, i, h.link(b, l))
				n++
			}
		}
		r := h.start(cr3, monAll, vasmon.Options{})
		if st := r.Stats(); st.OutOfRAM != int64(n) {
			t.Fatalf("OutOfRAM = %d after Start, want %d", st.OutOfRAM, n)
		}
		t2 := h.path(cr3, vaX, 2, false)
		j := h.idx(vaX, 2)
		for k, b := range bad {
			h.set(t2, j, h.link(b, 2))
			h.quiet()
			if st := r.Stats(); st.OutOfRAM != int64(n+k+1) {
				t.Fatalf("OutOfRAM = %d, want %d", st.OutOfRAM, n+k+1)
			}
		}
		h.set(t2, j, 0)
		h.quiet()
		r.stop()
	})
	// Frames at or above 2^32-1 pages are refused even inside a huge
	// (sparse) RAM: page numbers are kept in 32 bits.
	const huge = 1 << 46
	g := vasmontest.NewGuest(vasmon.Mode4, huge, hBase)
	h := &harness{t: t, mode: vasmon.Mode4, g: g, prot: vasmontest.NewProtections(), mon: vasmon.NewMonitor(), rec: vasmontest.NewRecorder()}
	if err := h.mon.AddVM(1, g.Mem, h.prot, 0); err != nil {
		t.Fatal(err)
	}
	cr3 := h.table()
	t3 := h.path(cr3, 0, 3, false)
	h.g.SetEntry(t3, 1, h.link((1<<32-1)*vasmon.PageSize, 3))
	h.g.SetEntry(t3, 2, h.link(1<<32*vasmon.PageSize, 3))
	h.g.SetEntry(t3, 3, h.link((1<<32-2)*vasmon.PageSize, 3)) // the last page that fits
	h.g.SetEntry((1<<32-2)*vasmon.PageSize, 5, h.leaf(0x5000, 2))
	r := h.start(cr3, monAll, vasmon.Options{})
	if st := r.Stats(); st.OutOfRAM != 2 || !h.prot.Protected((1<<32-2)*vasmon.PageSize) {
		t.Fatalf("huge frames: %+v", st)
	}
	r.stop()
}

// TestHostileReservedBits: bits the paging rules ignore or reserve (52..62,
// PAT, PSE-36, PDPTE RW/US) do not change what an entry is: the monitor and
// the walker agree.
func TestHostileReservedBits(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		cr3 := h.table()
		t1 := h.path(cr3, vaX, 1, false)
		t2 := h.path(cr3, vaX, 2, false)
		r := h.start(cr3, ^uint64(0), vasmon.Options{})
		var extra []uint64
		if mode.EntryBytes() == 8 {
			extra = []uint64{1 << 52, 0x7FF << 52, 1 << 62}
		} else {
			extra = []uint64{1 << 13, 0xFF << 13, 1 << 12} // PSE-36 and PAT bits of a 4 MiB PDE
		}
		i := h.idx(vaX, 1)
		for _, x := range extra {
			e := h.leaf(0x200000, 1) | x
			h.set(t1, i, e)
			r.expect(ev{VA: vaX, Old: 0, New: e, Size: kb4})
			h.set(t1, i, 0)
			r.expect(ev{VA: vaX, Old: e, New: 0, Size: kb4})
			// A large page with the bits.
			j := h.idx(vaX, 2) + 1
			big := h.leaf(0x400000*4, 2) | x
			va := uint64(vaX)&^(uint64(mode.Entries(1))*kb4-1) + uint64(mode.Entries(1))*kb4
			h.set(t2, j, big)
			r.expect(ev{VA: va, Old: 0, New: big, Size: largeLevels(mode)[2]})
			h.set(t2, j, 0)
			r.expect(ev{VA: va, Old: big, New: 0, Size: largeLevels(mode)[2]})
			// A table link with the bits (above 4 KiB-aligned address bits).
			if mode.EntryBytes() == 8 {
				tt := h.table()
				h.g.SetEntry(tt, 3, h.leaf(0x3000, 1))
				h.set(t2, j, h.link(tt, 2)|x)
				r.expect(ev{VA: va + 3*kb4, Old: 0, New: h.leaf(0x3000, 1), Size: kb4})
				h.set(t2, j, 0)
				r.expect(ev{VA: va + 3*kb4, Old: h.leaf(0x3000, 1), New: 0, Size: kb4})
			}
		}
		if mode == vasmon.ModePAE {
			// PDPTE with the (reserved) RW and US bits: still a table here.
			h.set(cr3, 0, h.link(h.table(), 3)|rwBit|usBit)
			h.quiet()
		}
		r.stop()
	})
}

// garbageGuest fills a pool of pages with random bytes, a few entries of
// which point to pool pages (with random flags), and returns the pool.
func garbageGuest(h *harness, rng *rand.Rand, npool int, linkPct int) []uint64 {
	pool := make([]uint64, npool)
	for i := range pool {
		pool[i] = h.table()
	}
	esz := h.mode.EntryBytes()
	for _, p := range pool {
		for i := 0; i < vasmon.PageSize/esz; i++ {
			h.g.SetEntry(p, i, garbageValue(h, rng, pool, linkPct))
		}
	}
	return pool
}

// garbageValue is a random entry: raw random bits, or (linkPct in 100) a
// pointer to a pool page with random low flags.
func garbageValue(h *harness, rng *rand.Rand, pool []uint64, linkPct int) uint64 {
	v := rng.Uint64()
	if rng.IntN(100) < linkPct {
		v = pool[rng.IntN(len(pool))] | uint64(rng.IntN(512)) | rng.Uint64()&(0xFFF<<52)
	}
	if h.mode.EntryBytes() == 4 {
		v &= 0xFFFFFFFF
	}
	return v
}

// TestHostileGarbage: pages of random bytes as tables. Start and random
// writes (whole and split) never panic, and since the walker applies the
// same rules the oracle, the hooked tables and the protections hold.
func TestHostileGarbage(t *testing.T) {
	steps, seeds := 120, uint64(2)
	if testing.Short() {
		steps, seeds = 40, 2
	}
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		for seed := uint64(1); seed <= seeds; seed++ {
			for _, opts := range []vasmon.Options{{}, {FullSpace: true}, {IgnoreNullPage: true}} {
				t.Run(fmt.Sprintf("seed=%d/full=%v/null=%v", seed, opts.FullSpace, opts.IgnoreNullPage), func(t *testing.T) {
					rng := rand.New(rand.NewPCG(seed, uint64(mode)))
					h := newHarness(t, mode)
					linkPct := 2
					if mode == vasmon.Mode32 {
						linkPct = 1 // 4-byte garbage already lands in RAM one time in 64
					}
					pool := garbageGuest(h, rng, 8, linkPct)
					cr3 := pool[0]
					if mode == vasmon.ModePAE {
						cr3 += uint64(rng.IntN(128)) * 32
					}
					// Make sure the root links a few pool pages (garbage
					// PDPTEs would almost never).
					for i := 0; i < 3; i++ {
						h.g.SetEntry(cr3, i, pool[1+rng.IntN(len(pool)-1)]|pBit|rwBit|rng.Uint64()&(0x7FF<<52))
					}
					r := h.start(cr3, ^uint64(0), opts)
					esz := mode.EntryBytes()
					for k := 0; k < steps; k++ {
						p := pool[rng.IntN(len(pool))]
						i := rng.IntN(vasmon.PageSize / esz)
						if rng.IntN(3) == 0 {
							i = rng.IntN(4) // the PDPT entries and the first entries
						}
						v := garbageValue(h, rng, pool, 5)
						if rng.IntN(4) == 0 {
							v = h.g.Entry(p, i) ^ 1<<rng.IntN(8*esz)
						}
						if rng.IntN(3) == 0 {
							// The upper part (a partial write: 4 of 8
							// bytes, 3 of 4), then the lower part, which
							// completes the entry.
							lo := esz / 2
							if esz == 4 {
								lo = 1
							}
							h.store(p+uint64(i*esz)+uint64(lo), esz-lo, v>>(8*lo))
							h.silent()
							h.store(p+uint64(i*esz), lo, v)
						} else {
							h.set(p, i, v)
						}
						r.take(false, h.rec.Peek(r)...)
						h.verify()
					}
					t.Logf("%d tables, %d mappings", r.Tables(), len(r.m))
					r.stop()
				})
			}
		}
	})
}

// TestHostilePartialFlood: a guest that starts a million entry writes and
// never completes them costs bounded host memory: past maxPending (1024)
// the oldest is completed with the bytes it has, counted in ForcedPartial.
func TestHostilePartialFlood(t *testing.T) {
	for _, mode := range []vasmon.Mode{vasmon.ModePAE, vasmon.Mode32} {
		t.Run(mode.String(), func(t *testing.T) {
			n := 1_000_000 // PAE guests write every entry in halves
			if mode == vasmon.Mode32 {
				n = 200_000
			}
			if testing.Short() {
				n = 50_000
			}
			h := newHarness(t, mode)
			cr3 := h.table()
			// 8 level-1 tables: 4096 (8192) entries, more than maxPending.
			var tables []uint64
			for k := 0; k < 8; k++ {
				tables = append(tables, h.path(cr3, 0x40000000+uint64(k)*uint64(mode.Entries(1))*kb4, 1, false))
			}
			r := h.start(cr3, monAll, vasmon.Options{})
			before := h.mon.Store().HostBytes()
			esz := mode.EntryBytes()
			half := esz / 2 // a half of an 8-byte entry: a partial write
			if esz == 4 {
				half = 3 // (1 and 2 bytes are narrow writes: complete at once)
			}
			per := mode.Entries(1)
			var maxHost uintptr
			t0 := time.Now()
			for k := 0; k < n; k++ {
				e := k % (len(tables) * per)
				// The low half of a leaf: frame changes every round.
				lo := h.leaf(uint64(k/(len(tables)*per)%8+1)<<12, 1)
				h.rip++
				w := h.g.Store(tables[e/per]+uint64(e%per*esz), half, lo, h.rip)
				if kind, err := h.mon.Write(1, w); err != nil || kind != vasmon.WritePartial {
					t.Fatalf("write %d: %v %v", k, kind, err)
				}
				if k%10000 == 0 {
					r.apply(h.rec.Take(r))
					maxHost = max(maxHost, h.mon.Store().HostBytes())
				}
			}
			took := time.Since(t0)
			r.apply(h.rec.Take(r))
			st := h.mon.Store().Stats()
			pending := h.mon.Store().Pending()
			t.Logf("%d partial writes in %v: forced %d, pending %d, host bytes %d -> %d (%+v)", n, took, st.ForcedPartial, pending, before, maxHost, st)
			if pending != 1024 || st.ForcedPartial != uint64(n-1024) {
				t.Fatalf("pending %d, forced %d", pending, st.ForcedPartial)
			}
			if maxHost-before > 64<<10 {
				t.Fatalf("pending writes grew host memory from %d to %d bytes", before, maxHost)
			}
			// Complete every entry with a whole store of its value: the
			// pending ones report their transition, and the oracle holds.
			for _, tb := range tables {
				for i := 0; i < per; i++ {
					h.write(h.g.SetEntry(tb, i, h.g.Entry(tb, i)))
				}
			}
			if pending := h.mon.Store().Pending(); pending != 0 {
				t.Fatalf("%d writes still pending", pending)
			}
			r.take(false, h.rec.Peek(r)...)
			h.verify()
			r.stop()
		})
	}
}
