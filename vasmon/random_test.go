package vasmon_test

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// scenario drives random guest writes against a monitor and checks the
// oracle after every completed entry write.
type scenario struct {
	t      testing.TB
	rng    *rand.Rand
	mode   vasmon.Mode
	g      *vasmontest.Guest
	prot   *vasmontest.Protections
	mon    *vasmon.Monitor
	rec    *vasmontest.Recorder
	tables []uint64 // candidate table pages
	roots  []*vasmon.Root
	maps   []vasmontest.Map
	idx    []int // entry indices written
	rip    uint64
	writes int
	kinds  [8]int
}

const ramBytes = 64 << 20

func newScenario(t testing.TB, mode vasmon.Mode, seed uint64, nroots int, opts vasmon.Options) *scenario {
	s := &scenario{t: t, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), mode: mode,
		g: vasmontest.NewGuest(mode, ramBytes, 1<<20), prot: vasmontest.NewProtections(),
		mon: vasmon.NewMonitor(), rec: vasmontest.NewRecorder()}
	if err := s.mon.AddVM(1, s.g.Mem, s.prot, 0); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 12; i++ {
		s.tables = append(s.tables, s.g.AllocTable())
	}
	n := mode.Entries(1)
	s.idx = []int{0, 1, 2, n - 1}
	if mode == vasmon.Mode32 {
		s.idx = append(s.idx, 511, 512) // user/kernel boundary of the root
	}
	if mode == vasmon.Mode4 || mode == vasmon.Mode5 {
		s.idx = append(s.idx, 255, 256)
	}
	// Seed the tree with a few mappings before monitoring starts.
	for r := 0; r < nroots; r++ {
		cr3 := s.tables[r]
		if mode == vasmon.ModePAE {
			cr3 += uint64(32 * r)
		}
		for k := 0; k < 6; k++ {
			s.writeFull(s.randomTable(), s.randomIndex(), s.randomValue(0), false)
		}
		monitored := vasmon.BitRW | vasmon.BitUS | vasmon.BitNX | vasmon.BitD | 0xFFFFFFFFFF000
		root, err := s.mon.Start(1, cr3, mode, monitored, s.rec.Callback, r, opts)
		if err != nil {
			t.Fatal(err)
		}
		if evs := s.rec.Take(r); len(evs) != 0 {
			t.Fatalf("Start reported %d callbacks", len(evs))
		}
		s.roots = append(s.roots, root)
		m, err := vasmontest.WalkRoot(s.g.Mem, root)
		if err != nil {
			t.Fatal(err)
		}
		s.maps = append(s.maps, m)
	}
	return s
}

func (s *scenario) randomTable() uint64 { return s.tables[s.rng.IntN(len(s.tables))] }
func (s *scenario) randomIndex() int    { return s.idx[s.rng.IntN(len(s.idx))] }

// randomValue returns an interesting entry value; cur is the current one.
func (s *scenario) randomValue(cur uint64) uint64 {
	var v uint64
	switch x := s.rng.IntN(100); {
	case x < 15:
		v = 0
	case x < 22:
		v = uint64(s.rng.IntN(1<<20)) << 12 // non-present, swap bits
	case x < 45: // leaf or large leaf
		v = uint64(s.rng.IntN(1<<18))<<21 | vasmon.BitP
		if s.rng.IntN(2) == 0 {
			v |= vasmon.BitPS
		}
		v |= uint64(s.rng.IntN(1<<9)) &^ vasmon.BitPS &^ 1 // RW US PWT PCD A D G
		if s.rng.IntN(3) == 0 {
			v |= vasmon.BitNX
		}
	case x < 75: // table pointer, maybe with A set or PS (reserved at some levels)
		v = s.randomTable() | vasmon.BitP | vasmon.BitRW | vasmon.BitUS
		if s.rng.IntN(4) == 0 {
			v |= vasmon.BitA
		}
	case x < 82: // toggle A/D only
		v = cur ^ (vasmon.BitA << uint(s.rng.IntN(2)))
	case x < 88: // a monitored permission flip
		v = cur ^ []uint64{vasmon.BitRW, vasmon.BitUS, vasmon.BitNX}[s.rng.IntN(3)]
	case x < 93: // outside RAM
		v = (ramBytes + uint64(s.rng.IntN(1<<10))<<12) | vasmon.BitP | vasmon.BitRW
	default: // PS flip
		v = cur ^ vasmon.BitPS
	}
	if s.mode.EntryBytes() == 4 {
		v &= 0xFFFFFFFF
	}
	return v
}

// writeFull writes entry i of table in one store; check=true runs the
// monitor and the oracle.
func (s *scenario) writeFull(table uint64, i int, v uint64, check bool) {
	w := s.g.SetEntry(table, i, v)
	if !check {
		return
	}
	if s.rng.IntN(3) == 0 {
		w.HasOld = false
	}
	s.feed(w)
	s.check()
}

// writeSplit writes the entry in chunks of random sizes and order, with
// duplicate deliveries; the oracle is checked once it completes.
func (s *scenario) writeSplit(table uint64, i int, v uint64) {
	esz := s.mode.EntryBytes()
	base := table + uint64(i*esz)
	// Split [0, esz) into chunks.
	var cuts []int
	for at := 0; at < esz; {
		n := 1 + s.rng.IntN(esz-at)
		if n == esz {
			n = esz / 2
		}
		cuts = append(cuts, at)
		at += n
	}
	cuts = append(cuts, esz)
	order := s.rng.Perm(len(cuts) - 1)
	for k, c := range order {
		lo, hi := cuts[c], cuts[c+1]
		s.rip++
		w := s.g.Store(base+uint64(lo), hi-lo, v>>(8*lo), s.rip)
		if k > 0 || s.rng.IntN(2) == 0 {
			w.HasOld = false
		}
		kind := s.feed(w)
		if kind == vasmon.WritePartial && s.rng.IntN(4) == 0 {
			k, _ := s.mon.Write(1, w) // duplicate delivery
			s.kinds[k]++
			if k != vasmon.WriteDuplicate {
				s.t.Fatalf("re-delivered chunk classified %v", k)
			}
		}
	}
	s.check()
}

func (s *scenario) feed(w vasmon.Write) vasmon.WriteKind {
	k, err := s.mon.Write(1, w)
	if err != nil {
		s.t.Fatal(err)
	}
	s.kinds[k]++
	s.writes++
	if testing.Verbose() && s.writes < debugWrites {
		s.t.Logf("write %d: gpa=%#x size=%d data=%#x old=%#x/%v -> %v", s.writes, w.GPA, w.Size, w.Data, w.Old, w.HasOld, k)
	}
	return k
}

var debugWrites = 12

// check flushes the monitor (a quiescent point: pending writes end) and
// checks the oracle of every root.
func (s *scenario) check() {
	s.t.Helper()
	if err := s.mon.Flush(); err != nil {
		s.t.Fatal(err)
	}
	for r, root := range s.roots {
		if root.Stopped() {
			continue
		}
		vasmontest.Apply(s.maps[r], s.mode, root.Monitored, s.rec.Take(r))
		want, err := vasmontest.WalkRoot(s.g.Mem, root)
		if err != nil {
			s.t.Fatal(err)
		}
		if d := vasmontest.Diff(want, s.maps[r], 10); d != "" {
			s.t.Fatalf("%v root %d after %d writes: oracle violated: %s", s.mode, r, s.writes, d)
		}
		if st := root.Stats(); st.Refused != 0 {
			s.t.Fatalf("budget refused %d tables", st.Refused)
		}
	}
	if len(s.prot.Errors) > 0 {
		s.t.Fatalf("protection errors: %v", s.prot.Errors)
	}
}

func (s *scenario) step() {
	t, i := s.randomTable(), s.randomIndex()
	v := s.randomValue(s.g.Entry(t, i))
	if s.rng.IntN(4) == 0 {
		s.writeSplit(t, i, v)
	} else {
		s.writeFull(t, i, v, true)
	}
}

// finish stops every root and checks that each reported its remaining
// mappings as removed and that no page stays protected.
func (s *scenario) finish() {
	for r, root := range s.roots {
		if err := s.mon.Stop(root); err != nil {
			s.t.Fatal(err)
		}
		vasmontest.Apply(s.maps[r], s.mode, root.Monitored, s.rec.Take(r))
		if len(s.maps[r]) != 0 {
			s.t.Fatalf("after Stop the map still holds %d mappings", len(s.maps[r]))
		}
		if root.Tables() != 0 {
			s.t.Fatalf("after Stop %d tables are still counted", root.Tables())
		}
	}
	if n := s.prot.Count(); n != 0 {
		s.t.Fatalf("%d pages still protected after every root stopped", n)
	}
	if st := s.mon.Store().Stats(); st.Tables != 0 || st.Pages != 0 {
		s.t.Fatalf("store still holds %d tables, %d pages", st.Tables, st.Pages)
	}
	if len(s.prot.Errors) > 0 {
		s.t.Fatalf("protection errors: %v", s.prot.Errors)
	}
}

func TestRandomOracle(t *testing.T) {
	steps := 4000
	if testing.Short() {
		steps = 800
	}
	for _, mode := range vasmon.Modes {
		for _, opts := range []vasmon.Options{{}, {FullSpace: true}, {IgnoreNullPage: true}} {
			for seed := uint64(1); seed <= 3; seed++ {
				t.Run(fmt.Sprintf("%v/full=%v/null=%v/seed=%d", mode, opts.FullSpace, opts.IgnoreNullPage, seed), func(t *testing.T) {
					s := newScenario(t, mode, seed, 2, opts)
					for k := 0; k < steps; k++ {
						s.step()
					}
					if s.kinds[vasmon.WriteRelevant] == 0 || s.kinds[vasmon.WritePartial] == 0 || s.kinds[vasmon.WriteIrrelevant] == 0 {
						t.Fatalf("random writes did not exercise every kind: %v", s.kinds)
					}
					s.finish()
				})
			}
		}
	}
}
