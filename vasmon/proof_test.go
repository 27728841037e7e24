package vasmon_test

import (
	"testing"

	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// Proofs by stamp (proof.go, Store.linkedAt): a value written by a store
// stamped before it reached memory (Write.Stamped) is proven without
// reading guest memory when every table of its page was proven linked
// before the store and no ancestor page changed since; otherwise it is
// proven on guest memory. Each case fails if one of the two conditions is
// dropped.
func TestStampProofs(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		cr3 := h.table()
		t1 := h.path(cr3, vaX, 1, false)
		t2 := h.path(cr3, vaX, 2, false)
		i1, i2 := h.idx(vaX, 1), h.idx(vaX, 2)
		r := h.start(cr3, monAll, vasmon.Options{})
		st := func() vasmon.StoreStats { return h.mon.Store().Stats() }

		// In sequence, chain proven at the hook: proven by the stamp.
		e1 := h.leaf(0x1234000, 1)
		before := st()
		h.set(t1, i1, e1)
		r.expect(ev{VA: vaX, Old: 0, New: e1, Size: kb4})
		if a := st(); a.StampProofs != before.StampProofs+1 || a.Proofs != before.Proofs {
			t.Fatalf("stamped write: %d stamp proofs, %d proofs, want 1 and 0",
				a.StampProofs-before.StampProofs, a.Proofs-before.Proofs)
		}
		// A store stamped after it reached memory (Stamped false) is
		// proven on guest memory.
		before = st()
		w := h.g.SetEntry(t1, i1, 0)
		w.Stamped = false
		h.write(w)
		r.expect(ev{VA: vaX, Old: e1, New: 0, Size: kb4})
		if a := st(); a.StampProofs != before.StampProofs || a.Proofs != before.Proofs+1 {
			t.Fatalf("unstamped write: %d stamp proofs, %d proofs, want 0 and 1",
				a.StampProofs-before.StampProofs, a.Proofs-before.Proofs)
		}

		// The guest unlinks t1, writes g into it while it is not linked,
		// overwrites it with g2, and links t1 again at the same place; then
		// writes x into another entry. The engine sees x first (another
		// vCPU's ring), which proves t1 linked again, after g was made.
		j, k := (i1+1)%mode.Entries(1), (i1+2)%mode.Entries(1)
		vaJ := mode.EntryVA(vaX&^(uint64(mode.Entries(1))*kb4-1), 1, j)
		vaK := mode.EntryVA(vaX&^(uint64(mode.Entries(1))*kb4-1), 1, k)
		g, g2, x := h.leaf(0x7777000, 1), h.leaf(0x8888000, 1), h.leaf(0x9999000, 1)
		unlink := h.g.SetEntry(t2, i2, 0)
		wg := h.g.SetEntry(t1, j, g)
		wg2 := h.g.SetEntry(t1, j, g2)
		relink := h.g.SetEntry(t2, i2, h.link(t1, 2))
		wx := h.g.SetEntry(t1, k, x)
		if !wg.Stamped || wg.Ver == 0 {
			t.Fatal("a store to a hooked page was not stamped before it")
		}
		for _, w := range []vasmon.Write{wx, wg, wg2, unlink, relink} {
			h.write(w)
		}
		// g never was a mapping while t1 was linked: it must not be
		// reported (a store made before the proof is not proven by it).
		evs := h.rec.Take(r)
		for _, e := range evs {
			if e.New == g {
				t.Fatalf("phantom: %v reported; t1 was not linked while it held %#x", e, g)
			}
		}
		r.apply(evs)
		h.verify()
		if r.m[vasmontest.Key{VA: vaJ, Size: kb4}] == 0 || r.m[vasmontest.Key{VA: vaK, Size: kb4}] == 0 {
			t.Fatalf("map after the writes lacks va %#x or %#x: %v", vaJ, vaK, evString(evs))
		}

		// A store made after the proof, into a table whose ancestor page
		// changed since (here: unlinked, data written, linked again with
		// the data overwritten), is proven on guest memory again.
		unlink = h.g.SetEntry(t2, i2, 0)
		wg = h.g.SetEntry(t1, j, g)
		h.g.SetEntry(t1, j, g2) // (not delivered before the check)
		relink = h.g.SetEntry(t2, i2, h.link(t1, 2))
		before = st()
		h.write(wg)
		for _, e := range h.rec.Peek(r) {
			if e.New == g {
				t.Fatalf("phantom: %v reported after the chain changed", e)
			}
		}
		if a := st(); a.StampProofs != before.StampProofs {
			t.Fatal("a write whose table's ancestors changed was proven by its stamp")
		}
		r.apply(h.rec.Take(r))
		h.write(unlink)
		h.write(relink)
		r.apply(h.rec.Take(r))
		h.verify()
		r.stop()
	})
}
