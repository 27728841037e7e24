package vasmon_test

import (
	"testing"

	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// Steady state allocates nothing: the monitor's arenas, indexes and output
// buffers are reused once warmed up.

// nopProt is an allocation-free Protector that counts its calls.
type nopProt struct{ protects, unprotects int }

func (p *nopProt) Protect(uint64) error   { p.protects++; return nil }
func (p *nopProt) Unprotect(uint64) error { p.unprotects++; return nil }

// steady is a monitored root with a level-1 table holding one leaf (at
// vaX), and a prefilled level-1 table that can be linked next to it: the
// fixture of the allocation tests and the write benchmarks. Each write is a
// store of the guest (memory written, the page's version stamped, as a
// backend traps it) fed to the monitor.
type steady struct {
	g     *vasmontest.Guest
	mon   *vasmon.Monitor
	prot  *nopProt
	calls int
	// Leaf writes: the leaf with RW cleared, then set again.
	leaf [2]store
	// The same two changes, each as a partial chunk and the chunk that
	// completes it.
	halves [4]store
	// A/D-only changes of the leaf.
	ad [2]store
	// Link and unlink of a level-1 table holding nLinked leaves.
	link [2]store
}

// store is one guest store.
type store struct {
	gpa, v, rip uint64
	size        int
}

const nLinked = 8

// verProt is nopProt that keeps the guest's version words.
type verProt struct {
	nopProt
	g *vasmontest.Guest
}

func (p *verProt) Protect(gpa uint64) error {
	p.g.Ver.SetProtected(gpa, true)
	return p.nopProt.Protect(gpa)
}

func (p *verProt) Unprotect(gpa uint64) error {
	p.g.Ver.SetProtected(gpa, false)
	return p.nopProt.Unprotect(gpa)
}

func newSteady(tb testing.TB, mode vasmon.Mode) *steady {
	h := &harness{t: tb, mode: mode, g: vasmontest.NewGuest(mode, hRAM, hBase)}
	vp := &verProt{g: h.g}
	s := &steady{g: h.g, mon: vasmon.NewMonitor(), prot: &vp.nopProt}
	cr3 := h.table()
	t1 := h.path(cr3, vaX, 1, false)
	t2 := h.path(cr3, vaX, 2, false)
	esz := mode.EntryBytes()
	e := h.leaf(0x1234000, 1)
	h.g.SetEntry(t1, h.idx(vaX, 1), e)
	gpa := t1 + uint64(h.idx(vaX, 1)*esz)
	full := func(v uint64) store { return store{gpa: gpa, v: v, size: esz} }
	s.leaf = [2]store{full(e ^ rwBit), full(e)}
	s.ad = [2]store{full(e | vasmon.BitA | vasmon.BitD), full(e)}
	// 8-byte entries: two 4-byte halves; 4-byte entries: 3 bytes, then
	// the last byte (a narrow write, which completes the pending one).
	first := esz / 2
	if esz == 4 {
		first = 3
	}
	lo := func(v uint64) uint64 { return v & (1<<(8*first) - 1) }
	s.halves = [4]store{
		{gpa: gpa, v: lo(e ^ rwBit), size: first, rip: 1},
		{gpa: gpa + uint64(first), v: (e ^ rwBit) >> (8 * first), size: esz - first, rip: 2},
		{gpa: gpa, v: lo(e), size: first, rip: 1},
		{gpa: gpa + uint64(first), v: e >> (8 * first), size: esz - first, rip: 2},
	}
	tt := h.table()
	for i := 0; i < nLinked; i++ {
		h.g.SetEntry(tt, 3*i, h.leaf(uint64(i+1)<<12, 1))
	}
	lgpa := t2 + uint64((h.idx(vaX, 2)+1)*esz)
	s.link = [2]store{{gpa: lgpa, v: h.link(tt, 2), size: esz}, {gpa: lgpa, v: 0, size: esz}}
	if err := s.mon.AddVM(1, h.g.Memory(), vp, 0); err != nil {
		tb.Fatal(err)
	}
	cb := func(any, uint64, uint64, uint64, uint64) { s.calls++ }
	if _, err := s.mon.Start(1, cr3, mode, monAll, cb, nil, vasmon.Options{}); err != nil {
		tb.Fatal(err)
	}
	return s
}

// write makes the store w and feeds it, checking its kind (without
// t.Helper, on the hot path).
func (s *steady) write(tb testing.TB, w *store, want vasmon.WriteKind) {
	ev := s.g.Store(w.gpa, w.size, w.v, w.rip)
	k, err := s.mon.Write(1, ev)
	if err != nil || k != want {
		tb.Fatalf("write %+v: %v %v, want %v", ev, k, err, want)
	}
}

// The operations measured, each leaving the fixture as it found it and
// making a known number of callbacks.
func (s *steady) leafPair(tb testing.TB) {
	s.write(tb, &s.leaf[0], vasmon.WriteRelevant)
	s.write(tb, &s.leaf[1], vasmon.WriteRelevant)
}

func (s *steady) halvesPair(tb testing.TB) {
	s.write(tb, &s.halves[0], vasmon.WritePartial)
	s.write(tb, &s.halves[1], vasmon.WriteRelevant)
	s.write(tb, &s.halves[2], vasmon.WritePartial)
	s.write(tb, &s.halves[3], vasmon.WriteRelevant)
}

func (s *steady) adPair(tb testing.TB) {
	s.write(tb, &s.ad[0], vasmon.WriteIrrelevant)
	s.write(tb, &s.ad[1], vasmon.WriteIrrelevant)
}

func (s *steady) linkPair(tb testing.TB) {
	s.write(tb, &s.link[0], vasmon.WriteRelevant)
	s.write(tb, &s.link[1], vasmon.WriteRelevant)
}

func TestAllocs(t *testing.T) {
	ops := []struct {
		name  string
		op    func(*steady, testing.TB)
		calls int // callbacks per op
	}{
		{"leaf", (*steady).leafPair, 2},
		{"partial", (*steady).halvesPair, 2},
		{"irrelevant", (*steady).adPair, 0},
		{"hook-unhook", (*steady).linkPair, 2 * nLinked},
	}
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		for _, o := range ops {
			t.Run(o.name, func(t *testing.T) {
				s := newSteady(t, mode)
				for i := 0; i < 10; i++ { // warm up
					o.op(s, t)
				}
				calls, protects := s.calls, s.prot.protects
				const runs = 200
				if a := testing.AllocsPerRun(runs, func() { o.op(s, t) }); a != 0 {
					t.Fatalf("%v allocations per %s", a, o.name)
				}
				// AllocsPerRun runs the function once more to warm up.
				if got := s.calls - calls; got != (runs+1)*o.calls {
					t.Fatalf("%d callbacks in %d runs, want %d each", got, runs+1, o.calls)
				}
				if o.name == "hook-unhook" && (s.prot.protects-protects != runs+1 || s.prot.protects-s.prot.unprotects != mode.Levels()) {
					t.Fatalf("%d protects, %d unprotects", s.prot.protects, s.prot.unprotects)
				}
				if st := s.mon.Store().Stats(); st.Tables != mode.Levels() {
					t.Fatalf("%d tables hooked after the runs", st.Tables)
				}
			})
		}
	})
}
