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

// Stopping a root ends the partial writes of its own tables only
// (SEMANTICS.md section 3, "its root stopped"; Store.FlushRoot): a write
// half done in another root's table goes on, and its second half
// completes it. (Ending every partial write would complete the first half
// alone and leave the second pending by itself: for a synchronous guest, a
// table linked and not hooked.)
func TestStopEndsOwnPartialWrites(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		if mode.EntryBytes() != 8 {
			t.Skip("4-byte entries have no partial writes")
		}
		h := newHarness(t, mode)
		cra, crb := h.table(), h.table()
		ta := h.path(cra, vaX, 1, false)
		tb := h.path(crb, vaX, 1, false)
		i := h.idx(vaX, 1)
		h.g.SetEntry(ta, i, h.leaf(0x1111000, 1))
		ra := h.start(cra, monAll, vasmon.Options{})
		rb := h.start(crb, monAll, vasmon.Options{})
		e := h.leaf(0x2222000, 1) | nxBit
		wantKind(t, h.store(tb+uint64(8*i)+4, 4, e>>32), vasmon.WritePartial)
		h.silent()
		ra.stop()
		if n := h.mon.Store().Pending(); n != 1 {
			t.Fatalf("%d partial writes pending after another root's Stop, want 1", n)
		}
		wantKind(t, h.store(tb+uint64(8*i), 4, e&0xFFFFFFFF), vasmon.WriteRelevant)
		rb.expect(ev{VA: vaX, Old: 0, New: e, Size: kb4})
		rb.stop()
	})
}

// A partial write that a synchronous write starts is timed from Held (when
// its vCPU was released), not from its trap: the time the engine held the
// vCPU does not count towards its expiry (Write.Held).
func TestPendingTimedFromHeld(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		if mode.EntryBytes() != 8 {
			t.Skip("4-byte entries have no partial writes")
		}
		h := newHarness(t, mode)
		h.mon.Store().PendingTimeout = 1000
		cr3 := h.table()
		t1 := h.path(cr3, vaX, 1, false)
		i, j := h.idx(vaX, 1), (h.idx(vaX, 1)+1)%mode.Entries(1)
		r := h.start(cr3, monAll, vasmon.Options{})
		e, other := h.leaf(0x2222000, 1)|nxBit, h.leaf(0x3333000, 1)
		w := h.g.Store(t1+uint64(8*i)+4, 4, e>>32, 1)
		w.Trap, w.Held = 100, 5000
		wantKind(t, h.write(w), vasmon.WritePartial)
		// An event trapped 1.9 us after the half, 3.1 us before the vCPU
		// was released: the partial write goes on.
		w = h.g.SetEntry(t1, j, other)
		w.Trap = 2000
		h.write(w)
		r.take(true, ev{VA: vaX + kb4, Old: 0, New: other, Size: kb4})
		if n := h.mon.Store().Pending(); n != 1 {
			t.Fatalf("the partial write expired %d ns of trap time after its vCPU was released, before the timeout (1000)", 2000-5000)
		}
		// One trapped more than the timeout after the release ends it.
		w = h.g.SetEntry(t1, j, 0)
		w.Trap = 6100
		h.write(w)
		if n := h.mon.Store().Pending(); n != 0 {
			t.Fatal("the partial write did not expire 1.1 us after its vCPU was released")
		}
		// (Completed with its high half only: NX over a non-present
		// entry, nothing to report.)
		r.expect(ev{VA: vaX + kb4, Old: other, New: 0, Size: kb4})
		if st := h.mon.Store().Stats(); st.ExpiredPartial != 1 {
			t.Fatalf("%d partial writes expired, want 1", st.ExpiredPartial)
		}
	})
}
