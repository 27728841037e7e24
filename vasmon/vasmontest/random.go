package vasmontest

import (
	"math/rand/v2"

	"github.com/vasengine/vasengine/vasmon"
)

// RandomWriter makes random page-table writes on a Guest: a small pool of
// table pages, a few entry indices per table (so trees stay small but alias,
// nest and self-reference freely), and values of every interesting kind
// (non-present, swap bits, 4K and large leaves, table pointers, A/D-only and
// permission flips, pointers outside RAM, PS flips). It is deterministic
// from its seed.
type RandomWriter struct {
	G      *Guest
	Rng    *rand.Rand
	Tables []uint64
	Idx    []int
	rip    uint64
	// NoSplit makes every write a single full-entry store.
	NoSplit bool
}

// NewRandomWriter allocates ntables table pages in g.
func NewRandomWriter(g *Guest, seed uint64, ntables int) *RandomWriter {
	w := &RandomWriter{G: g, Rng: rand.New(rand.NewPCG(seed, seed^0x5851f42d4c957f2d))}
	for i := 0; i < ntables; i++ {
		w.Tables = append(w.Tables, g.AllocTable())
	}
	n := g.Mode.Entries(1)
	w.Idx = []int{0, 1, 2, n - 1}
	switch g.Mode {
	case vasmon.Mode32:
		w.Idx = append(w.Idx, 511, 512)
	case vasmon.Mode4, vasmon.Mode5:
		w.Idx = append(w.Idx, 255, 256)
	}
	return w
}

// Table returns a random table page of the pool.
func (w *RandomWriter) Table() uint64 { return w.Tables[w.Rng.IntN(len(w.Tables))] }

// Value returns a random interesting entry value; cur is the current one.
func (w *RandomWriter) Value(cur uint64) uint64 {
	r := w.Rng
	var v uint64
	switch x := r.IntN(100); {
	case x < 15:
		v = 0
	case x < 22:
		v = uint64(r.IntN(1<<20)) << 12
	case x < 45:
		v = uint64(r.IntN(1<<18))<<21 | vasmon.BitP
		if r.IntN(2) == 0 {
			v |= vasmon.BitPS
		}
		v |= uint64(r.IntN(1<<9)) &^ vasmon.BitPS &^ 1
		if r.IntN(3) == 0 {
			v |= vasmon.BitNX
		}
	case x < 75:
		v = w.Table() | vasmon.BitP | vasmon.BitRW | vasmon.BitUS
		if r.IntN(4) == 0 {
			v |= vasmon.BitA
		}
	case x < 82:
		v = cur ^ (vasmon.BitA << uint(r.IntN(2)))
	case x < 88:
		v = cur ^ []uint64{vasmon.BitRW, vasmon.BitUS, vasmon.BitNX}[r.IntN(3)]
	case x < 93:
		v = (w.G.Mem.Size() + uint64(r.IntN(1<<10))<<12) | vasmon.BitP | vasmon.BitRW
	default:
		v = cur ^ vasmon.BitPS
	}
	if w.G.Mode.EntryBytes() == 4 {
		v &= 0xFFFFFFFF
	}
	return v
}

// Next makes one random entry write (applied to guest memory) and returns
// its events: one full store, or (one time in four unless NoSplit) the entry
// split into chunks of random sizes stored in random order.
func (w *RandomWriter) Next() []vasmon.Write {
	t := w.Table()
	i := w.Idx[w.Rng.IntN(len(w.Idx))]
	v := w.Value(w.G.Entry(t, i))
	if w.NoSplit || w.Rng.IntN(4) != 0 {
		ev := w.G.SetEntry(t, i, v)
		if w.Rng.IntN(3) == 0 {
			ev.HasOld = false
		}
		return []vasmon.Write{ev}
	}
	esz := w.G.Mode.EntryBytes()
	base := t + uint64(i*esz)
	var cuts []int
	for at := 0; at < esz; {
		n := 1 + w.Rng.IntN(esz-at)
		if n == esz {
			n = esz / 2
		}
		cuts = append(cuts, at)
		at += n
	}
	cuts = append(cuts, esz)
	var evs []vasmon.Write
	for _, c := range w.Rng.Perm(len(cuts) - 1) {
		lo, hi := cuts[c], cuts[c+1]
		w.rip++
		ev := w.G.Store(base+uint64(lo), hi-lo, v>>(8*lo), w.rip)
		if len(evs) > 0 {
			ev.HasOld = false
		}
		evs = append(evs, ev)
	}
	return evs
}
