package vasmon_test

import (
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// One test per rule of SEMANTICS.md sections 1-5. Every step checks the exact
// callback stream, then (harness.verify) the oracle, the hooked tables
// against a full walk and the protected pages.

// vaX is a user address valid in every mode: 32-bit PDE 257, PAE PDPTE 1,
// 4/5-level PML4E/PML5E 0.
const vaX = 0x40603000

func wantKind(t testing.TB, got, want vasmon.WriteKind) {
	t.Helper()
	if got != want {
		t.Fatalf("write classified %v, want %v", got, want)
	}
}

// nx returns NX in 8-byte modes and 0 in 32-bit mode (which has no NX).
func (h *harness) nx() uint64 {
	if h.mode.EntryBytes() == 4 {
		return 0
	}
	return nxBit
}

// largeLevels returns the levels where PS makes a leaf, and the page size
// of each.
func largeLevels(mode vasmon.Mode) map[int]uint64 {
	switch mode {
	case vasmon.Mode32:
		return map[int]uint64{2: mb4}
	case vasmon.ModePAE:
		return map[int]uint64{2: mb2}
	default:
		return map[int]uint64{2: mb2, 3: gb1}
	}
}

// Section 1, rule 4: a level-1 entry going not present -> leaf, leaf -> leaf
// and leaf -> not present is reported with the entries of the same level.
func TestRuleMapUnmapRemap(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		cr3 := h.table()
		t1 := h.path(cr3, vaX, 1, false)
		r := h.start(cr3, monAll, vasmon.Options{})
		i := h.idx(vaX, 1)
		a := h.leaf(0x1234000, 1)
		b := h.leaf(0x5678000, 1) | h.nx()

		wantKind(t, h.set(t1, i, a), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: 0, New: a, Size: kb4})
		wantKind(t, h.set(t1, i, b), vasmon.WriteRelevant) // remap
		r.expect(ev{VA: vaX, Old: a, New: b, Size: kb4})
		swap := uint64(0x00ABC000) // not present: swap bits
		wantKind(t, h.set(t1, i, swap), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: b, New: swap, Size: kb4})
		// Not present -> not present is no mapping change.
		wantKind(t, h.set(t1, i, swap+0x1000), vasmon.WriteIrrelevant)
		h.quiet()
		wantKind(t, h.set(t1, i, a), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: swap + 0x1000, New: a, Size: kb4})
		// The last entry of the table.
		last := mode.Entries(1) - 1
		wantKind(t, h.set(t1, last, b), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX&^(mb2-1)&^(uint64(mode.Entries(1))*kb4-1) | uint64(last)*kb4, Old: 0, New: b, Size: kb4})
		wantKind(t, h.set(t1, i, 0), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: a, New: 0, Size: kb4})
		r.stop()
	})
}

// Section 1, rule 4: a change of a monitored bit of a leaf is reported, a
// change of any other bit is not; P is always monitored.
func TestRulePermissions(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		cr3 := h.table()
		t1 := h.path(cr3, vaX, 1, false)
		i := h.idx(vaX, 1)
		e := h.leaf(0x1234000, 1)
		h.g.SetEntry(t1, i, e)
		r := h.start(cr3, rwBit|usBit|nxBit|frameMask, vasmon.Options{})

		flips := []uint64{rwBit, usBit}
		if h.nx() != 0 {
			flips = append(flips, nxBit)
		}
		for _, bit := range flips {
			wantKind(t, h.set(t1, i, e^bit), vasmon.WriteRelevant)
			r.expect(ev{VA: vaX, Old: e, New: e ^ bit, Size: kb4})
			wantKind(t, h.set(t1, i, e), vasmon.WriteRelevant)
			r.expect(ev{VA: vaX, Old: e ^ bit, New: e, Size: kb4})
		}
		quiet := []uint64{vasmon.BitA, vasmon.BitD, vasmon.BitG, vasmon.BitPWT, vasmon.BitPCD, psBit /* PAT at level 1 */}
		if mode.EntryBytes() == 8 {
			quiet = append(quiet, 1<<52, 1<<58, 1<<62)
		}
		for _, bit := range quiet {
			wantKind(t, h.set(t1, i, e|bit), vasmon.WriteIrrelevant)
			h.quiet()
			wantKind(t, h.set(t1, i, e), vasmon.WriteIrrelevant)
			h.quiet()
		}
		r.stop()

		// Monitoring only RW: US and frame changes are not reported, P is.
		h2 := newHarness(t, mode)
		cr3 = h2.table()
		t1 = h2.path(cr3, vaX, 1, false)
		r = h2.start(cr3, rwBit, vasmon.Options{})
		wantKind(t, h2.set(t1, i, e), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: 0, New: e, Size: kb4})
		wantKind(t, h2.set(t1, i, e^usBit), vasmon.WriteIrrelevant)
		h2.quiet()
		wantKind(t, h2.set(t1, i, e^usBit^0x777000), vasmon.WriteIrrelevant)
		h2.quiet()
		wantKind(t, h2.set(t1, i, e^usBit^0x777000^rwBit), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: e ^ usBit ^ 0x777000, New: e ^ usBit ^ 0x777000 ^ rwBit, Size: kb4})
		wantKind(t, h2.set(t1, i, 0), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: e ^ usBit ^ 0x777000 ^ rwBit, New: 0, Size: kb4})

		// Monitoring nothing still reports presence changes.
		h3 := newHarness(t, mode)
		cr3 = h3.table()
		t1 = h3.path(cr3, vaX, 1, false)
		r = h3.start(cr3, 0, vasmon.Options{})
		wantKind(t, h3.set(t1, i, e), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: 0, New: e, Size: kb4})
		wantKind(t, h3.set(t1, i, e^rwBit^0x1000), vasmon.WriteIrrelevant)
		h3.quiet()
		wantKind(t, h3.set(t1, i, 0), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: e ^ rwBit ^ 0x1000, New: 0, Size: kb4})
	})
}

// prefilledL1 returns a fresh level-1 table holding leaves at entries 0, 5
// and the last one, and a not-present swap entry at 7; and the events that
// report those leaves new when the table is linked at va.
func (h *harness) prefilledL1(va, frame uint64) (uint64, []ev) {
	t := h.table()
	last := h.mode.Entries(1) - 1
	var evs []ev
	for _, i := range []int{0, 5, last} {
		e := h.leaf(frame+uint64(i)<<12, 1)
		h.g.SetEntry(t, i, e)
		evs = append(evs, ev{VA: va + uint64(i)*kb4, Old: 0, New: e, Size: kb4})
	}
	h.g.SetEntry(t, 7, 0xDEAD000)
	return t, evs
}

// removed turns "new" events into the matching "removed" ones.
func removed(evs []ev) []ev {
	out := make([]ev, len(evs))
	for i, e := range evs {
		out[i] = ev{VA: e.VA, Old: e.New, New: 0, Size: e.Size}
	}
	return out
}

// Section 1, rule 1 and section 4: linking a table (not present -> table)
// hooks it and reports each present leaf already in it as new, in entry
// order, level by level; under HVMICompat it is hooked silently. Unlinking
// it (table -> not present, rule 2) reports every present leaf of the
// subtree removed and unprotects its pages.
func TestRuleLinkUnlink(t *testing.T) {
	for _, compat := range []bool{false, true} {
		t.Run(fmt.Sprintf("compat=%v", compat), func(t *testing.T) {
			forModes(t, func(t *testing.T, mode vasmon.Mode) {
				opts := vasmon.Options{HVMICompat: compat}
				levels := mode.Levels()
				// A prefilled level-1 table at an L2 entry.
				h := newHarness(t, mode)
				cr3 := h.table()
				const vaY = 0x40800000
				t2 := h.path(cr3, vaY, 2, false)
				r := h.start(cr3, monAll, opts)
				t1, evs := h.prefilledL1(vaY, 0x3000000)
				wantKind(t, h.set(t2, h.idx(vaY, 2), h.link(t1, 2)), vasmon.WriteRelevant)
				if !h.prot.Protected(t1) {
					t.Fatal("linked table not protected")
				}
				if compat {
					h.quiet()
					// Hooked, though silently: a change in it is reported.
					e := h.leaf(0x7777000, 1)
					wantKind(t, h.set(t1, 1, e), vasmon.WriteRelevant)
					r.expect(ev{VA: vaY + kb4, Old: 0, New: e, Size: kb4})
					evs = append(evs, ev{VA: vaY + kb4, Old: 0, New: e, Size: kb4})
					slices.SortFunc(evs, func(a, b ev) int { return cmpU(a.VA, b.VA) })
				} else {
					r.expect(evs...)
				}
				wantKind(t, h.set(t2, h.idx(vaY, 2), 0), vasmon.WriteRelevant)
				r.expect(removed(evs)...)
				if h.prot.Protected(t1) {
					t.Fatal("unlinked table still protected")
				}
				// Linking to a not-present value with swap bits is an unlink too.
				wantKind(t, h.set(t2, h.idx(vaY, 2), h.link(t1, 2)), vasmon.WriteRelevant)
				if !compat {
					r.expect(evs...)
				} else {
					h.quiet()
				}
				wantKind(t, h.set(t2, h.idx(vaY, 2), 0xBEEF000), vasmon.WriteRelevant)
				r.expect(removed(evs)...)
				r.stop()
				if levels < 3 {
					return
				}

				// A prefilled level-2 table (a large leaf, a swap entry and a
				// prefilled level-1 table) at an L3 entry: its own leaves first,
				// then its child's.
				h = newHarness(t, mode)
				cr3 = h.table()
				const vaB = 0x40000000
				t3 := h.path(cr3, vaB, 3, false)
				r = h.start(cr3, monAll, opts)
				u := h.table()
				t1, evs1 := h.prefilledL1(vaB, 0x3000000)
				h.g.SetEntry(u, 0, h.link(t1, 2))
				l3 := h.leaf(0x40000000, 2)
				lLast := h.leaf(0x80000000, 2) | h.nx()
				last := mode.Entries(2) - 1
				h.g.SetEntry(u, 3, l3)
				h.g.SetEntry(u, 4, 0xABC000)
				h.g.SetEntry(u, last, lLast)
				want := append([]ev{
					{VA: vaB + 3*mb2, Old: 0, New: l3, Size: mb2},
					{VA: vaB + uint64(last)*mb2, Old: 0, New: lLast, Size: mb2},
				}, evs1...)
				wantKind(t, h.set(t3, h.idx(vaB, 3), h.link(u, 3)), vasmon.WriteRelevant)
				if compat {
					h.quiet()
				} else {
					r.expect(want...)
				}
				if !h.prot.Protected(u) || !h.prot.Protected(t1) {
					t.Fatal("linked subtree not protected")
				}
				wantKind(t, h.set(t3, h.idx(vaB, 3), 0), vasmon.WriteRelevant)
				r.expect(removed(want)...)
				if h.prot.Protected(u) || h.prot.Protected(t1) {
					t.Fatal("unlinked subtree still protected")
				}
				r.stop()
				if levels < 4 {
					return
				}

				// A prefilled level-3 table (a 1 GiB leaf and a level-2 table
				// with a 2 MiB leaf) at an L4 entry.
				h = newHarness(t, mode)
				cr3 = h.table()
				const vaC = 0x8000000000 // PML4E 1
				t4 := h.path(cr3, vaC, 4, false)
				r = h.start(cr3, monAll, opts)
				w, u2 := h.table(), h.table()
				g5 := h.leaf(0x140000000, 3)
				m2 := h.leaf(0x600000, 2)
				h.g.SetEntry(w, 0, h.link(u2, 3))
				h.g.SetEntry(w, 5, g5)
				h.g.SetEntry(u2, 2, m2)
				want = []ev{{VA: vaC + 5*gb1, Old: 0, New: g5, Size: gb1}, {VA: vaC + 2*mb2, Old: 0, New: m2, Size: mb2}}
				wantKind(t, h.set(t4, h.idx(vaC, 4), h.link(w, 4)), vasmon.WriteRelevant)
				if compat {
					h.quiet()
				} else {
					r.expect(want...)
				}
				wantKind(t, h.set(t4, h.idx(vaC, 4), 0), vasmon.WriteRelevant)
				r.expect(removed(want)...)
				r.stop()
			})
		})
	}
}

// Section 1, rule 3: re-pointing a table entry to another table unhooks the
// old subtree (its leaves removed) and hooks the new one (its leaves new),
// level by level; a change of the entry's flags alone does nothing.
func TestRuleRepoint(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		cr3 := h.table()
		const vaY = 0x40800000
		t2 := h.path(cr3, vaY, 2, false)
		a, b := h.table(), h.table()
		a1, a2 := h.leaf(0x100000, 1), h.leaf(0x200000, 1)
		b2, b3 := h.leaf(0x300000, 1), h.leaf(0x400000, 1)
		h.g.SetEntry(a, 1, a1)
		h.g.SetEntry(a, 2, a2)
		h.g.SetEntry(b, 2, b2)
		h.g.SetEntry(b, 3, b3)
		j := h.idx(vaY, 2)
		h.g.SetEntry(t2, j, h.link(a, 2))
		r := h.start(cr3, monAll, vasmon.Options{})
		wantKind(t, h.set(t2, j, h.link(b, 2)), vasmon.WriteRelevant)
		r.expect(
			ev{VA: vaY + 1*kb4, Old: a1, New: 0, Size: kb4},
			ev{VA: vaY + 2*kb4, Old: a2, New: 0, Size: kb4},
			ev{VA: vaY + 2*kb4, Old: 0, New: b2, Size: kb4},
			ev{VA: vaY + 3*kb4, Old: 0, New: b3, Size: kb4},
		)
		if h.prot.Protected(a) || !h.prot.Protected(b) {
			t.Fatal("re-point did not move the protection")
		}
		// Same table, other flags: a table entry is not a leaf.
		wantKind(t, h.set(t2, j, h.link(b, 2)|vasmon.BitA), vasmon.WriteIrrelevant)
		h.quiet()
		wantKind(t, h.set(t2, j, h.link(b, 2)^rwBit), vasmon.WriteIrrelevant)
		h.quiet()
		r.stop()
		if mode.Levels() < 3 {
			return
		}

		// Two levels: the removals of each level come before the additions
		// at the same place.
		h = newHarness(t, mode)
		cr3 = h.table()
		const vaB = 0x40000000
		t3 := h.path(cr3, vaB, 3, false)
		ua, ub, ta, tb := h.table(), h.table(), h.table(), h.table()
		ua1, ub1 := h.leaf(0x600000, 2), h.leaf(0xA00000, 2)
		ta0, tb0 := h.leaf(0x11000, 1), h.leaf(0x22000, 1)
		h.g.SetEntry(ua, 0, h.link(ta, 2))
		h.g.SetEntry(ua, 1, ua1)
		h.g.SetEntry(ub, 0, h.link(tb, 2))
		h.g.SetEntry(ub, 1, ub1)
		h.g.SetEntry(ta, 0, ta0)
		h.g.SetEntry(tb, 0, tb0)
		h.g.SetEntry(t3, h.idx(vaB, 3), h.link(ua, 3))
		r = h.start(cr3, monAll, vasmon.Options{})
		wantKind(t, h.set(t3, h.idx(vaB, 3), h.link(ub, 3)), vasmon.WriteRelevant)
		r.expect(
			ev{VA: vaB + mb2, Old: ua1, New: 0, Size: mb2},
			ev{VA: vaB + mb2, Old: 0, New: ub1, Size: mb2},
			ev{VA: vaB, Old: ta0, New: 0, Size: kb4},
			ev{VA: vaB, Old: 0, New: tb0, Size: kb4},
		)
		r.stop()
	})
}

// Section 1: a level-2 entry going table <-> large page, and large page
// changes, are reported with the level-2 entries and the large page size;
// the 4 KiB leaves of the table are reported removed or new. The same at
// level 3 with 1 GiB pages in 4- and 5-level paging.
func TestRuleLargePages(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		for level, size := range largeLevels(mode) {
			t.Run(fmt.Sprintf("L%d", level), func(t *testing.T) {
				h := newHarness(t, mode)
				cr3 := h.table()
				va := uint64(0x40000000) // PDE 256 (32-bit), PDPTE 1, PML4E 0
				if mode == vasmon.Mode32 {
					va = 0x40400000
				}
				if level == 3 {
					va = 0x80000000 // a 1 GiB boundary
				}
				parent := h.path(cr3, va, level, false)
				j := h.idx(va, level)
				// The child table (level-1) or subtree (level-2 with a
				// level-1 table) that the large page replaces.
				child := h.table()
				var leaves []ev
				if level == 2 {
					for _, i := range []int{0, 9} {
						e := h.leaf(0x900000+uint64(i)<<12, 1)
						h.g.SetEntry(child, i, e)
						leaves = append(leaves, ev{VA: va + uint64(i)*kb4, Old: 0, New: e, Size: kb4})
					}
				} else {
					sub := h.table()
					e2 := h.leaf(0x1400000, 2)
					e1 := h.leaf(0x5000, 1)
					h.g.SetEntry(child, 0, h.link(sub, 2))
					h.g.SetEntry(child, 4, e2)
					h.g.SetEntry(sub, 3, e1)
					leaves = []ev{{VA: va + 4*mb2, Old: 0, New: e2, Size: mb2}, {VA: va + 3*kb4, Old: 0, New: e1, Size: kb4}}
				}
				tE := h.link(child, level)
				h.g.SetEntry(parent, j, tE)
				r := h.start(cr3, monAll, vasmon.Options{})

				big := h.leaf(size*3, level)
				wantKind(t, h.set(parent, j, big), vasmon.WriteRelevant)
				r.expect(append([]ev{{VA: va, Old: tE, New: big, Size: size}}, removed(leaves)...)...)
				if h.prot.Protected(child) {
					t.Fatal("table replaced by a large page still protected")
				}
				big2 := h.leaf(size*5, level) | h.nx()
				wantKind(t, h.set(parent, j, big2), vasmon.WriteRelevant)
				r.expect(ev{VA: va, Old: big, New: big2, Size: size})
				wantKind(t, h.set(parent, j, big2|vasmon.BitA|vasmon.BitD), vasmon.WriteIrrelevant)
				h.quiet()
				wantKind(t, h.set(parent, j, tE), vasmon.WriteRelevant)
				r.expect(append([]ev{{VA: va, Old: big2 | vasmon.BitA | vasmon.BitD, New: tE, Size: size}}, leaves...)...)
				if !h.prot.Protected(child) {
					t.Fatal("table that replaced a large page not protected")
				}
				wantKind(t, h.set(parent, j, big), vasmon.WriteRelevant)
				r.expect(append([]ev{{VA: va, Old: tE, New: big, Size: size}}, removed(leaves)...)...)
				wantKind(t, h.set(parent, j, 0), vasmon.WriteRelevant)
				r.expect(ev{VA: va, Old: big, New: 0, Size: size})
				wantKind(t, h.set(parent, j, big), vasmon.WriteRelevant)
				r.expect(ev{VA: va, Old: 0, New: big, Size: size})
				r.stop()

				// Monitoring RW only: a large page and a table entry with
				// the same RW differ in no monitored bit, yet the mapping
				// goes (and comes back) with the change of kind.
				h = newHarness(t, mode)
				cr3 = h.table()
				parent = h.path(cr3, va, level, false)
				tE = h.link(h.table(), level) // an empty table
				h.g.SetEntry(parent, j, tE)
				r = h.start(cr3, rwBit, vasmon.Options{})
				wantKind(t, h.set(parent, j, tE|psBit), vasmon.WriteRelevant)
				r.expect(ev{VA: va, Old: tE, New: tE | psBit, Size: size})
				wantKind(t, h.set(parent, j, tE), vasmon.WriteRelevant)
				r.expect(ev{VA: va, Old: tE | psBit, New: tE, Size: size})
				r.stop()
			})
		}
	})
}

// Section 2: PS where it is reserved (PML4E, PML5E, PAE PDPTE) maps nothing
// and links nothing: it is counted, never reported, and a table replaced by
// it is unhooked.
func TestRuleReservedPS(t *testing.T) {
	reserved := map[vasmon.Mode][]int{vasmon.Mode32: nil, vasmon.ModePAE: {3}, vasmon.Mode4: {4}, vasmon.Mode5: {5, 4}}
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		for l := 2; l <= mode.Levels(); l++ {
			if ok := mode.LargeOK(l); ok == slices.Contains(reserved[mode], l) {
				t.Fatalf("LargeOK(%d) = %v", l, ok)
			}
		}
		for _, level := range reserved[mode] {
			t.Run(fmt.Sprintf("L%d", level), func(t *testing.T) {
				h := newHarness(t, mode)
				cr3 := h.table()
				t1 := h.path(cr3, vaX, 1, false)
				e := h.leaf(0x4321000, 1)
				h.g.SetEntry(t1, h.idx(vaX, 1), e)
				parent := h.path(cr3, vaX, level, false)
				j := h.idx(vaX, level)
				tE := h.g.Entry(parent, j)
				// A second, reserved entry present at Start.
				other := j ^ 1
				h.g.SetEntry(parent, other, h.link(h.table(), level)|psBit)
				r := h.start(cr3, monAll, vasmon.Options{})
				if st := r.Stats(); st.Reserved != 1 {
					t.Fatalf("Start counted %d reserved entries, want 1", st.Reserved)
				}
				wantKind(t, h.set(parent, j, tE|psBit), vasmon.WriteRelevant)
				r.expect(ev{VA: vaX, Old: e, New: 0, Size: kb4})
				if h.prot.Protected(t1) {
					t.Fatal("table under a reserved entry still protected")
				}
				if st := r.Stats(); st.Reserved != 2 {
					t.Fatalf("reserved = %d, want 2", st.Reserved)
				}
				wantKind(t, h.set(parent, j, tE), vasmon.WriteRelevant)
				r.expect(ev{VA: vaX, Old: 0, New: e, Size: kb4})
				wantKind(t, h.set(parent, j, 0), vasmon.WriteRelevant)
				r.expect(ev{VA: vaX, Old: e, New: 0, Size: kb4})
				// Not present -> reserved: nothing mapped, nothing reported.
				wantKind(t, h.set(parent, j, 0x40000000|pBit|rwBit|psBit), vasmon.WriteIrrelevant)
				h.quiet()
				if st := r.Stats(); st.Reserved != 3 {
					t.Fatalf("reserved = %d, want 3", st.Reserved)
				}
				wantKind(t, h.set(parent, j, 0), vasmon.WriteIrrelevant)
				h.quiet()
				r.stop()
			})
		}
	})
}

// Section 2: a PAE root is a 32-byte PDPT at any 32-byte offset of its page;
// two roots may share the page, which is protected once.
func TestRulePAERoot(t *testing.T) {
	h := newHarness(t, vasmon.ModePAE)
	page := h.table()
	cr3 := page + 0x40
	t1 := h.path(cr3, vaX, 1, false)
	r := h.start(cr3, monAll, vasmon.Options{})
	if d := h.mon.Dump(r.Root); d[0].Level != 3 || d[0].GPA != cr3 || d[0].Entries != 2 {
		t.Fatalf("root dumped as %+v", d[0])
	}
	e := h.leaf(0x777000, 1)
	wantKind(t, h.set(t1, h.idx(vaX, 1), e), vasmon.WriteRelevant)
	r.expect(ev{VA: vaX, Old: 0, New: e, Size: kb4})
	// PDPTE 0 of this root, at offset 0x40: link a table with a 2 MiB page.
	u := h.table()
	big := h.leaf(0xE00000, 2)
	h.g.SetEntry(u, 7, big)
	wantKind(t, h.set(cr3, 0, h.link(u, 3)), vasmon.WriteRelevant)
	r.expect(ev{VA: 7 * mb2, Old: 0, New: big, Size: mb2})
	// Bytes of the page outside the PDPT are not entries of this root.
	for _, off := range []uint64{0, 0x20, 0x60, 0xFF8} {
		h.write(h.g.SetEntry(page+off, 0, h.link(u, 3)))
		h.quiet()
	}

	// A second root in the same page at offset 0x20: the page is protected once.
	protects := h.prot.Protects
	u2 := h.table()
	h.g.SetEntry(u2, 1, big)
	h.g.SetEntry(page+0x20, 1, 0)
	r2 := h.start(page+0x20, monAll, vasmon.Options{})
	if h.prot.Protects != protects {
		t.Fatalf("second PDPT in a protected page protected it again (%d protects)", h.prot.Protects-protects)
	}
	wantKind(t, h.set(page+0x20, 1, h.link(u2, 3)), vasmon.WriteRelevant)
	r2.expect(ev{VA: gb1 + mb2, Old: 0, New: big, Size: mb2})
	r.expect()
	// A write to the first root does not reach the second.
	wantKind(t, h.set(cr3, 0, 0), vasmon.WriteRelevant)
	r.expect(ev{VA: 7 * mb2, Old: big, New: 0, Size: mb2})
	r2.expect()
	r.stop()
	if !h.prot.Protected(page) {
		t.Fatal("page of a live PDPT unprotected")
	}
	r2.stop()
	if h.prot.Count() != 0 {
		t.Fatalf("%d pages still protected", h.prot.Count())
	}
	// FullSpace: all four PDPTEs, the upper two at 2 and 3 GiB.
	h = newHarness(t, vasmon.ModePAE)
	page = h.table()
	r = h.start(page+0xFE0, monAll, vasmon.Options{FullSpace: true})
	u = h.table()
	h.g.SetEntry(u, 0, big)
	wantKind(t, h.set(page+0xFE0, 3, h.link(u, 3)), vasmon.WriteRelevant)
	r.expect(ev{VA: 0xC0000000, Old: 0, New: big, Size: mb2})
	r.stop()
}

// Section 2: virtual addresses are sign-extended from bit 47 (4-level) and
// bit 56 (5-level). Expected addresses are literals.
func TestRuleSignExtension(t *testing.T) {
	cases := []struct {
		mode vasmon.Mode
		full bool
		va   uint64
	}{
		{vasmon.Mode5, false, 0x0000800000000000}, // PML4E 256 under PML5E 0: 128 TiB, user
		{vasmon.Mode5, false, 0x0001000000000000}, // PML5E 1
		{vasmon.Mode5, false, 0x00FFFFFFFFFFF000}, // top of the 5-level user half
		{vasmon.Mode5, true, 0xFF00000000000000},  // PML5E 256
		{vasmon.Mode5, true, 0xFF00800000000000},  // PML5E 256, PML4E 256
		{vasmon.Mode5, true, 0xFFFFFFFFFFFFF000},
		{vasmon.Mode4, false, 0x00007FFFFFFFF000}, // top of the 4-level user half
		{vasmon.Mode4, true, 0xFFFF800000000000},  // PML4E 256
		{vasmon.Mode4, true, 0xFFFFFFFFFFFFF000},
		{vasmon.Mode32, true, 0xFFFFF000},
		{vasmon.ModePAE, true, 0xFFFFF000},
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("%v/%#x", c.mode, c.va), func(t *testing.T) {
			h := newHarness(t, c.mode)
			cr3 := h.table()
			r := h.start(cr3, monAll, vasmon.Options{FullSpace: c.full})
			t1 := h.path(cr3, c.va, 1, true)
			e := h.leaf(0x1000, 1)
			wantKind(t, h.set(t1, h.idx(c.va, 1), e), vasmon.WriteRelevant)
			r.expect(ev{VA: c.va, Old: 0, New: e, Size: kb4})
			d := h.mon.Dump(r.Root)
			if lt := d[len(d)-1]; lt.Level != 1 || lt.VA != c.va&^(uint64(c.mode.Entries(1))*kb4-1) {
				t.Fatalf("level-1 table dumped as %+v", lt)
			}
			r.stop()
		})
	}
	// 1 GiB and 2 MiB pages in the 5-level kernel half.
	h := newHarness(t, vasmon.Mode5)
	cr3 := h.table()
	r := h.start(cr3, monAll, vasmon.Options{FullSpace: true})
	const kva = 0xFF00000040000000
	t3 := h.path(cr3, kva, 3, true)
	g := h.leaf(gb1, 3)
	wantKind(t, h.set(t3, 1, g), vasmon.WriteRelevant)
	r.expect(ev{VA: kva, Old: 0, New: g, Size: gb1})
	r.stop()
}

// allSplits returns every way of cutting n bytes into contiguous chunks,
// each as a list of [lo, hi) chunks.
func allSplits(n int) [][][2]int {
	var out [][][2]int
	for cuts := 0; cuts < 1<<(n-1); cuts++ {
		var ch [][2]int
		lo := 0
		for b := 1; b < n; b++ {
			if cuts&(1<<(b-1)) != 0 {
				ch = append(ch, [2]int{lo, b})
				lo = b
			}
		}
		ch = append(ch, [2]int{lo, n})
		out = append(out, ch)
	}
	return out
}

// permutations returns every order of 0..k-1.
func permutations(k int) [][]int {
	if k == 0 {
		return [][]int{{}}
	}
	var out [][]int
	for _, p := range permutations(k - 1) {
		for at := 0; at <= len(p); at++ {
			q := make([]int, 0, k)
			q = append(q, p[:at]...)
			q = append(q, k-1)
			q = append(q, p[at:]...)
			out = append(out, q)
		}
	}
	return out
}

// chunkModel is the reference of SEMANTICS.md section 3 for one entry: it
// returns the values the entry completes with when written in the given
// chunks and order (a whole or narrow chunk completes it at once, merging a
// pending partial write; any other chunk is partial until every byte is
// written), and whether a partial write is left pending.
func chunkModel(esz int, cur, v uint64, chunks [][2]int, order []int) (done []uint64, pending bool) {
	var pval uint64
	var mask int
	for _, c := range order {
		lo, hi := chunks[c][0], chunks[c][1]
		n := hi - lo
		m := uint64(1)<<(8*n) - 1
		if n == 8 {
			m = ^uint64(0)
		}
		m <<= 8 * lo
		base := cur
		if pending {
			base = pval
		}
		val := base&^m | v&m
		if n == esz || n <= 2 {
			cur, pending, mask = val, false, 0
			done = append(done, val)
			continue
		}
		pval, pending = val, true
		mask |= (1<<n - 1) << lo
		if mask == 1<<esz-1 {
			cur, pending, mask = val, false, 0
			done = append(done, val)
		}
	}
	return done, pending
}

// Section 3: an entry written in chunks of any sizes in any order. A whole
// or narrow (1- or 2-byte) chunk completes the entry at once; any other
// chunk is a partial write that reports nothing until every byte of the
// entry is written or a whole or narrow chunk completes it; a partial write
// left pending ends at a quiescent point (Flush) with the bytes it has.
// Every completed value is reported as one transition from the value
// before it. Every split and every order is tried (8-byte entries: 95,901
// cases per mode; -short tries every split in 2 orders for the 8-byte modes
// and every order for 4-byte entries).
func TestRulePartialWrites(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		esz := mode.EntryBytes()
		h := newHarness(t, mode)
		cr3 := h.table()
		t1 := h.path(cr3, vaX, 1, false)
		var a, b uint64 // leaves differing in every byte
		if esz == 8 {
			a, b = 0x8A1B2C3D4E5F6067, 0x0192A3B4C5D6E025
		} else {
			a, b = 0x89ABC067, 0x12345025
		}
		i := h.idx(vaX, 1)
		h.g.SetEntry(t1, i, a)
		for k := 0; k < esz; k++ {
			if byte(a>>(8*k)) == byte(b>>(8*k)) {
				t.Fatalf("test values share byte %d", k)
			}
		}
		r := h.start(cr3, monAll, vasmon.Options{})
		perms := make([][][]int, esz+1)
		for k := 1; k <= esz; k++ {
			perms[k] = permutations(k)
		}
		// transition is the callback of a level-1 entry changing from old
		// to new, if any.
		transition := func(old, new uint64) []ev {
			if old&pBit == 0 && new&pBit == 0 || old&pBit == new&pBit && (old^new)&r.Monitored == 0 {
				return nil
			}
			return []ev{{VA: vaX, Old: old, New: new, Size: kb4}}
		}
		cases := 0
		cur := a
		gpa := t1 + uint64(i*esz)
		for _, chunks := range allSplits(esz) {
			orders := perms[len(chunks)]
			if testing.Short() && esz == 8 && len(orders) > 2 {
				orders = [][]int{orders[0], orders[len(orders)-1]}
			}
			for _, order := range orders {
				next := a ^ b ^ cur
				done, pending := chunkModel(esz, cur, next, chunks, order)
				var want []ev
				prev := cur
				for n, c := range order {
					lo, hi := chunks[c][0], chunks[c][1]
					h.rip++
					k, err := h.mon.Write(1, h.g.Store(gpa+uint64(lo), hi-lo, next>>(8*lo), h.rip))
					if err != nil {
						t.Fatal(err)
					}
					d, _ := chunkModel(esz, cur, next, chunks, order[:n+1])
					before, _ := chunkModel(esz, cur, next, chunks, order[:n])
					wk := vasmon.WritePartial
					if len(d) > len(before) {
						wk = vasmon.WriteIrrelevant
						if tr := transition(prev, d[len(d)-1]); tr != nil {
							wk = vasmon.WriteRelevant
							want = append(want, tr...)
						}
						prev = d[len(d)-1]
					}
					if k != wk {
						t.Fatalf("chunks %v order %v: chunk %d classified %v, want %v", chunks, order, n, k, wk)
					}
				}
				if pending {
					if err := h.mon.Flush(); err != nil {
						t.Fatal(err)
					}
					want = append(want, transition(prev, next)...)
				}
				if len(done) == 0 && !pending {
					t.Fatalf("chunks %v order %v: model completed nothing", chunks, order)
				}
				got := h.rec.Take(r)
				if !slices.Equal(got, want) {
					t.Fatalf("chunks %v order %v: callbacks%s\nwant%s", chunks, order, evString(got), evString(want))
				}
				r.apply(got)
				if cases%4096 == 0 {
					h.verify()
				}
				cur = next
				cases++
			}
		}
		h.verify()
		if st := h.mon.Store().Stats(); st.Writes[vasmon.WriteDuplicate] != 0 || st.Unconfirmed != 0 {
			t.Fatalf("%d writes taken for duplicates, %d unconfirmed", st.Writes[vasmon.WriteDuplicate], st.Unconfirmed)
		}
		t.Logf("%d split writes", cases)
		r.stop()
	})
}

// Section 3: the end of a partial write that the guest does not complete.
// It is completed with the bytes it has (counted as expired) when a later
// event for the same entry, or any later event of the store, was trapped
// more than PendingTimeout after its first chunk (trap times, never the
// monitor's clock); and when its table is unhooked, its root stopped or
// dumped, and at a Flush.
func TestRulePendingEnds(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		esz := mode.EntryBytes()
		first := esz / 2 // a partial chunk: a half of an 8-byte entry, 3 bytes of a 4-byte one
		if esz == 4 {
			first = 3
		}
		h := newHarness(t, mode)
		h.mon.Store().PendingTimeout = 1000
		cr3 := h.table()
		t1 := h.path(cr3, vaX, 1, false)
		t1b := h.path(cr3, vaX+uint64(mode.Entries(1))*kb4, 1, false) // another table
		i := h.idx(vaX, 1)
		gpa := t1 + uint64(i*esz)
		e := h.leaf(0x1234000, 1) | h.nx() // (every part of it differs from 0)
		r := h.start(cr3, monAll, vasmon.Options{})
		partial := func(trap int64) {
			h.rip++
			w := h.g.Store(gpa, first, e, h.rip)
			w.Trap = trap
			wantKind(t, h.write(w), vasmon.WritePartial)
		}
		half := e & (1<<(8*first) - 1)
		expired := func() uint64 { return h.mon.Store().Stats().ExpiredPartial }

		// Within the timeout, an event elsewhere does not end it.
		partial(10_000)
		vaB := (vaX + uint64(mode.Entries(1))*kb4) &^ (uint64(mode.Entries(1))*kb4 - 1)
		w := h.g.SetEntry(t1b, 7, h.leaf(0x7000, 1))
		w.Trap = 10_900
		h.write(w)
		r.take(true, ev{VA: vaB + 7*kb4, Old: 0, New: h.leaf(0x7000, 1), Size: kb4})
		h.silent()
		// Past it, any later event of the store ends it with its bytes.
		w = h.g.SetEntry(t1b, 7, 0)
		w.Trap = 11_001
		h.write(w)
		r.take(true, ev{VA: vaX, Old: 0, New: half, Size: kb4}, ev{VA: vaB + 7*kb4, Old: h.leaf(0x7000, 1), New: 0, Size: kb4})
		if expired() != 1 {
			t.Fatalf("expired %d, want 1", expired())
		}
		h.verify()
		// A later chunk of the same entry past the timeout ends the old one
		// first. Here the guest did complete the entry: the expired value
		// (its first chunk's bytes) is no longer in guest memory, so it is
		// not reported; the page is read again and the transition to what
		// guest memory holds is reported. The later chunk, already in that
		// read (by its version stamp), is then dropped as stale.
		h.set(t1, i, 0)
		r.take(true, ev{VA: vaX, Old: half, New: 0, Size: kb4})
		partial(20_000)
		h.rip++
		w = h.g.Store(gpa+uint64(first), esz-first, e>>(8*first), h.rip)
		w.Trap = 21_001
		stale := h.mon.Store().Stats().StaleWrites
		wantKind(t, h.write(w), vasmon.WriteUntracked)
		r.expect(ev{VA: vaX, Old: 0, New: e, Size: kb4})
		if st := h.mon.Store().Stats(); st.StaleWrites != stale+1 || st.Unconfirmed == 0 {
			t.Fatalf("stats %+v", st)
		}
		// Trap 0 (unknown) never expires anything.
		h.set(t1, i, 0)
		r.take(true, ev{VA: vaX, Old: e, New: 0, Size: kb4})
		partial(0)
		w = h.g.SetEntry(t1b, 8, 0)
		w.Trap = 1 << 40
		h.write(w)
		h.silent()
		// Dump ends it (a quiescent point).
		h.mon.Dump(r.Root)
		r.expect(ev{VA: vaX, Old: 0, New: half, Size: kb4})
		// Unhooking its table ends it first: reported, then removed (Stop:
		// guest memory still links the table).
		h.set(t1, i, 0)
		r.take(true, ev{VA: vaX, Old: half, New: 0, Size: kb4})
		partial(0)
		if err := h.mon.Stop(r.Root); err != nil {
			t.Fatal(err)
		}
		got := h.rec.Take(r)
		if len(got) < 2 || got[0] != (ev{VA: vaX, Old: 0, New: half, Size: kb4}) || !slices.Contains(got, ev{VA: vaX, Old: half, New: 0, Size: kb4}) {
			t.Fatalf("Stop with a partial write pending reported:%s", evString(got))
		}
		if n := h.mon.Store().Pending(); n != 0 || h.prot.Count() != 0 {
			t.Fatalf("%d partial writes still pending, %d pages protected", n, h.prot.Count())
		}

		// When guest memory unlinked the table before the unhook, the
		// forced value can no longer be proven: it is not reported.
		r = h.start(cr3, monAll, vasmon.Options{})
		partial(0)
		t2 := h.path(cr3, vaX, 2, false)
		wantKind(t, h.set(t2, h.idx(vaX, 2), 0), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: half, New: 0, Size: kb4}) // (in memory at Start)
		if n := h.mon.Store().Pending(); n != 0 {
			t.Fatalf("%d partial writes still pending", n)
		}
		r.stop()
	})
}

// Section 3: narrow writes (1 or 2 bytes: atomic bit operations on an
// entry in place, such as lock andb clearing RW or lock btsq setting NX)
// complete the entry at once.
func TestRuleNarrowWrites(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		esz := mode.EntryBytes()
		h := newHarness(t, mode)
		cr3 := h.table()
		t1 := h.path(cr3, vaX, 1, false)
		i := h.idx(vaX, 1)
		gpa := t1 + uint64(i*esz)
		e := h.leaf(0x1234000, 1)
		h.g.SetEntry(t1, i, e)
		r := h.start(cr3, monAll, vasmon.Options{})
		// lock andb $~2, (pte): RW cleared.
		wantKind(t, h.store(gpa, 1, e&0xFF&^rwBit), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: e, New: e &^ rwBit, Size: kb4})
		// A 2-byte store of the low bytes, RW set again.
		wantKind(t, h.store(gpa, 2, e&0xFFFF), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: e &^ rwBit, New: e, Size: kb4})
		// An A/D-only byte: irrelevant.
		wantKind(t, h.store(gpa, 1, (e|vasmon.BitA)&0xFF), vasmon.WriteIrrelevant)
		h.quiet()
		if esz == 8 {
			// lock btsq $63: NX set through the top byte.
			cur := h.g.Entry(t1, i)
			wantKind(t, h.store(gpa+7, 1, (cur|nxBit)>>56), vasmon.WriteRelevant)
			r.expect(ev{VA: vaX, Old: cur, New: cur | nxBit, Size: kb4})
			// A narrow write of a byte in the middle of a pending
			// partial write completes it with its bytes.
			h.store(gpa, 4, 0) // low half cleared: partial
			h.silent()
			wantKind(t, h.store(gpa+5, 1, 0), vasmon.WriteRelevant)
			want := (cur | nxBit) &^ 0xFF0000FFFFFFFF
			r.expect(ev{VA: vaX, Old: cur | nxBit, New: want, Size: kb4})
		}
		r.stop()
	})
}

// Section 3: a write that crosses an entry boundary is split per entry,
// and one that crosses a page boundary is split per page; each part is a
// chunk of its own entry.
func TestRuleCrossingWrites(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		esz := uint64(mode.EntryBytes())
		h := newHarness(t, mode)
		cr3 := h.table()
		const vaY = 0x40800000
		t2 := h.path(cr3, vaY, 2, false)
		ta, tb := h.table(), h.table() // adjacent pages
		if tb != ta+vasmon.PageSize {
			t.Fatal("tables not adjacent")
		}
		j := h.idx(vaY, 2)
		h.g.SetEntry(t2, j, h.link(ta, 2))
		h.g.SetEntry(t2, j+1, h.link(tb, 2))
		span := uint64(mode.Entries(1)) * kb4 // VA span of a level-1 table
		r := h.start(cr3, monAll, vasmon.Options{})
		e1, e2 := h.leaf(0x111000, 1), h.leaf(0x222000, 1)
		lastA := uint64(mode.Entries(1) - 1)
		if esz == 4 {
			// One 8-byte store writes two whole entries.
			wantKind(t, h.store(ta+8, 8, e2<<32|e1), vasmon.WriteRelevant)
			r.expect(ev{VA: vaY + 2*kb4, Old: 0, New: e1, Size: kb4}, ev{VA: vaY + 3*kb4, Old: 0, New: e2, Size: kb4})
			// Across the page boundary: the last entry of ta, the first of tb.
			wantKind(t, h.store(ta+vasmon.PageSize-4, 8, e2<<32|e1), vasmon.WriteRelevant)
			r.expect(ev{VA: vaY + lastA*kb4, Old: 0, New: e1, Size: kb4}, ev{VA: vaY + span, Old: 0, New: e2, Size: kb4})
			// Two bytes across an entry boundary: byte 3 of entry 2
			// rewritten as it was, byte 0 of entry 3 cleared (P): two
			// narrow writes, complete at once.
			wantKind(t, h.store(ta+8+3, 2, e1>>24&0xFF), vasmon.WriteRelevant)
			r.expect(ev{VA: vaY + 3*kb4, Old: e2, New: e2 &^ 0xFF, Size: kb4})
			// Four bytes across an entry boundary: 3 bytes of entry 3 (a
			// partial write) and 1 of entry 4 (narrow).
			wantKind(t, h.store(ta+12+1, 4, e2>>8|0xFF<<24), vasmon.WriteRelevant)
			r.take(true, ev{VA: vaY + 4*kb4, Old: 0, New: 0xFF, Size: kb4})
			wantKind(t, h.store(ta+12, 1, e2), vasmon.WriteRelevant)
			r.expect(ev{VA: vaY + 3*kb4, Old: e2 &^ 0xFF, New: e2, Size: kb4})
			wantKind(t, h.store(ta+16, 4, 0), vasmon.WriteRelevant)
			r.expect(ev{VA: vaY + 4*kb4, Old: 0xFF, New: 0, Size: kb4})
		} else {
			// An 8-byte store at +4 writes the high half of entry 2 and
			// the low half of entry 3: both stay partial.
			wantKind(t, h.store(ta+16+4, 8, (e2&0xFFFFFFFF)<<32|e1>>32), vasmon.WritePartial)
			h.silent()
			wantKind(t, h.store(ta+16, 4, e1), vasmon.WriteRelevant)
			r.take(true, ev{VA: vaY + 2*kb4, Old: 0, New: e1, Size: kb4}) // entry 3 still partial
			wantKind(t, h.store(ta+24+4, 4, e2>>32), vasmon.WriteRelevant)
			r.expect(ev{VA: vaY + 3*kb4, Old: 0, New: e2, Size: kb4})
			// Two bytes across an entry boundary: the top byte of entry 2
			// and the low byte of entry 3, rewritten as they were: narrow,
			// complete at once, nothing changes.
			wantKind(t, h.store(ta+16+7, 2, (e2&0xFF)<<8|e1>>56), vasmon.WriteIrrelevant)
			h.quiet()
			// Across the page boundary, completing both entries at once.
			wantKind(t, h.store(ta+vasmon.PageSize-8, 4, e1), vasmon.WritePartial)
			wantKind(t, h.store(tb+4, 4, e2>>32), vasmon.WritePartial)
			h.silent()
			wantKind(t, h.store(ta+vasmon.PageSize-4, 8, (e2&0xFFFFFFFF)<<32|e1>>32), vasmon.WriteRelevant)
			r.expect(ev{VA: vaY + lastA*kb4, Old: 0, New: e1, Size: kb4}, ev{VA: vaY + span, Old: 0, New: e2, Size: kb4})
		}
		// Unlink tb: a write across ta's end into tb then only counts ta's part.
		wantKind(t, h.set(t2, j+1, 0), vasmon.WriteRelevant)
		r.expect(ev{VA: vaY + span, Old: e2, New: 0, Size: kb4})
		if esz == 4 {
			wantKind(t, h.store(ta+vasmon.PageSize-4, 8, 0), vasmon.WriteRelevant)
			r.expect(ev{VA: vaY + lastA*kb4, Old: e1, New: 0, Size: kb4})
		} else {
			wantKind(t, h.store(ta+vasmon.PageSize-8, 4, 0), vasmon.WritePartial)
			wantKind(t, h.store(ta+vasmon.PageSize-4, 8, 0), vasmon.WriteRelevant)
			r.expect(ev{VA: vaY + lastA*kb4, Old: e1, New: 0, Size: kb4})
		}
		r.stop()
	})
}

// Section 3: a chunk with the same RIP, offset, size and bytes as the last
// chunk applied to its entry is a duplicate delivery: ignored and counted,
// whether or not that chunk completed the entry. The same bytes from
// another RIP, or after another chunk of the entry, are a new write; RIP 0
// (unknown) never makes a duplicate.
func TestRuleDuplicateDelivery(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		esz := mode.EntryBytes()
		first := esz / 2 // the partial chunk, then the one that completes it
		if esz == 4 {
			first = 3
		}
		h := newHarness(t, mode)
		cr3 := h.table()
		t1 := h.path(cr3, vaX, 1, false)
		i := h.idx(vaX, 1)
		gpa := t1 + uint64(i*esz)
		r := h.start(cr3, monAll, vasmon.Options{})
		e := h.leaf(0x1234000, 1) | h.nx()
		lo, hi := e&(1<<(8*first)-1), e>>(8*first)
		dups := func() uint64 { return h.mon.Store().Stats().Writes[vasmon.WriteDuplicate] }

		w := h.g.Store(gpa, first, lo, 100)
		wantKind(t, h.write(w), vasmon.WritePartial)
		wantKind(t, h.write(w), vasmon.WriteDuplicate)
		wantKind(t, h.write(w), vasmon.WriteDuplicate)
		if dups() != 2 {
			t.Fatalf("%d duplicates counted, want 2", dups())
		}
		w = h.g.Store(gpa, first, lo, 101) // same bytes, another instruction
		wantKind(t, h.write(w), vasmon.WritePartial)
		h.silent()
		done := h.g.Store(gpa+uint64(first), esz-first, hi, 102)
		wantKind(t, h.write(done), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: 0, New: e, Size: kb4})
		// The completing chunk delivered again: a duplicate, not the start
		// of a new partial write...
		wantKind(t, h.write(done), vasmon.WriteDuplicate)
		if dups() != 3 {
			t.Fatalf("%d duplicates counted, want 3", dups())
		}
		// ...so the next update, upper part first, is reported whole (not
		// torn: the old upper part with the new lower part).
		e2 := h.leaf(0x5555000, 1)
		wantKind(t, h.write(h.g.Store(gpa+uint64(first), esz-first, e2>>(8*first), 103)), kindOf(esz-first))
		if esz-first > 2 {
			h.silent()
			wantKind(t, h.write(h.g.Store(gpa, first, e2&(1<<(8*first)-1), 104)), vasmon.WriteRelevant)
			r.expect(ev{VA: vaX, Old: e, New: e2, Size: kb4})
		} else {
			mid := e2>>(8*first)<<(8*first) | lo
			r.take(true, ev{VA: vaX, Old: e, New: mid, Size: kb4})
			wantKind(t, h.write(h.g.Store(gpa, first, e2&(1<<(8*first)-1), 104)), vasmon.WritePartial)
			if err := h.mon.Flush(); err != nil {
				t.Fatal(err)
			}
			r.expect(ev{VA: vaX, Old: mid, New: e2, Size: kb4})
		}
		// After another chunk of the entry, the same chunk again is a write.
		a := h.g.Store(gpa, 1, e2&0xFF^rwBit, 105)
		wantKind(t, h.write(a), vasmon.WriteRelevant)
		wantKind(t, h.write(h.g.Store(gpa, 1, e2&0xFF, 106)), vasmon.WriteRelevant)
		a = h.g.Store(gpa, 1, e2&0xFF^rwBit, 105)
		wantKind(t, h.write(a), vasmon.WriteRelevant)
		wantKind(t, h.write(a), vasmon.WriteDuplicate)
		wantKind(t, h.write(h.g.Store(gpa, 1, e2&0xFF, 106)), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: e2, New: e2 ^ rwBit, Size: kb4}, ev{VA: vaX, Old: e2 ^ rwBit, New: e2, Size: kb4},
			ev{VA: vaX, Old: e2, New: e2 ^ rwBit, Size: kb4}, ev{VA: vaX, Old: e2 ^ rwBit, New: e2, Size: kb4})
		// RIP 0 (unknown) never makes a duplicate: two stores of the same
		// bytes from unknown instructions are two writes. (The same trap
		// delivered twice carries the same version stamp: a duplicate
		// whatever its RIP; see TestStaleWrites.)
		wantKind(t, h.write(h.g.Store(gpa, first, 0, 0)), vasmon.WritePartial)
		wantKind(t, h.write(h.g.Store(gpa, first, 0, 0)), vasmon.WritePartial)
		wantKind(t, h.write(h.g.Store(gpa+uint64(first), esz-first, 0, 0)), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: e2, New: 0, Size: kb4})
		if dups() != 4 {
			t.Fatalf("%d duplicates counted, want 4", dups())
		}
		r.stop()
	})
}

// kindOf is the kind of a chunk of n bytes of a changing entry with no
// partial write pending: narrow chunks complete it.
func kindOf(n int) vasmon.WriteKind {
	if n <= 2 {
		return vasmon.WriteRelevant
	}
	return vasmon.WritePartial
}

// Section 3: the old value reported is the backend's (Write.Old, read
// before the write, with A/D set by the CPU) in the bits no table of the
// page monitors, and the shadow value (what the tables last acted on) in the
// bits they monitor: a backend's read can be ahead of the shadow there (a
// write of the entry not applied yet), and taking it would lose that change
// from the callback stream (the oracle, section 6).
func TestRuleHasOld(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		cr3 := h.table()
		t1 := h.path(cr3, vaX, 1, false)
		i := h.idx(vaX, 1)
		e := h.leaf(0x1234000, 1)
		h.g.SetEntry(t1, i, e)
		r := h.start(cr3, rwBit|usBit|frameMask, vasmon.Options{})
		dirty := e | vasmon.BitA | vasmon.BitD
		// The CPU sets A and D without a trap.
		h.g.Mem.WriteUint(t1+uint64(i*mode.EntryBytes()), mode.EntryBytes(), dirty)

		w := h.g.SetEntry(t1, i, 0)
		if !w.HasOld || w.Old != dirty {
			t.Fatalf("guest produced %+v", w)
		}
		wantKind(t, h.write(w), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: dirty, New: 0, Size: kb4})

		// Without Old, the shadow value (no A/D) is reported.
		wantKind(t, h.set(t1, i, e), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: 0, New: e, Size: kb4})
		h.g.Mem.WriteUint(t1+uint64(i*mode.EntryBytes()), mode.EntryBytes(), dirty)
		w = h.g.SetEntry(t1, i, 0)
		w.HasOld = false
		wantKind(t, h.write(w), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: e, New: 0, Size: kb4})

		// An Old disagreeing with the shadow in the frame is not trusted.
		wantKind(t, h.set(t1, i, e), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: 0, New: e, Size: kb4})
		w = h.g.SetEntry(t1, i, 0)
		w.Old = e ^ 0x10000
		wantKind(t, h.write(w), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: e, New: 0, Size: kb4})

		// An Old ahead of the shadow in a monitored bit (RW cleared by a
		// write not yet applied): the change is reported from the shadow's
		// RW, with Old's A/D.
		wantKind(t, h.set(t1, i, e), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: 0, New: e, Size: kb4})
		ahead := (e &^ rwBit) | vasmon.BitA | vasmon.BitD
		w = h.g.SetEntry(t1, i, ahead&^vasmon.BitD)
		w.Old = ahead
		wantKind(t, h.write(w), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: e | vasmon.BitA | vasmon.BitD, New: ahead &^ vasmon.BitD, Size: kb4})
		wantKind(t, h.set(t1, i, 0), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: ahead &^ vasmon.BitD, New: 0, Size: kb4})

		// The first chunk's Old is the old value of a split write.
		wantKind(t, h.set(t1, i, e), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: 0, New: e, Size: kb4})
		h.g.Mem.WriteUint(t1+uint64(i*mode.EntryBytes()), mode.EntryBytes(), dirty)
		first := mode.EntryBytes() / 2
		if first == 2 {
			first = 3
		}
		gpa := t1 + uint64(i*mode.EntryBytes())
		w = h.g.Store(gpa, first, 0, 1)
		if w.Old != dirty {
			t.Fatalf("first chunk carries old %#x", w.Old)
		}
		wantKind(t, h.write(w), vasmon.WritePartial)
		wantKind(t, h.write(h.g.Store(gpa+uint64(first), mode.EntryBytes()-first, 0, 2)), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: dirty, New: 0, Size: kb4})
		r.stop()
	})
}

// kernelIndex returns a kernel-half root index and the address it maps.
func kernelIndex(mode vasmon.Mode) (int, uint64) {
	switch mode {
	case vasmon.Mode32:
		return 600, 600 << 22
	case vasmon.ModePAE:
		return 2, 0x80000000
	case vasmon.Mode4:
		return 300, 0xFFFF800000000000 | 300<<39
	default:
		return 300, 0xFF00000000000000 | 300<<48
	}
}

// Section 5: the kernel half is ignored by default (writes to it counted
// OutOfScope, tables under it not hooked) and monitored with FullSpace.
func TestRuleScope(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		k, kva := kernelIndex(mode)
		top := mode.Levels()
		for _, full := range []bool{false, true} {
			t.Run(fmt.Sprintf("full=%v", full), func(t *testing.T) {
				h := newHarness(t, mode)
				cr3 := h.table()
				// A kernel table present at Start.
				pre := h.table()
				h.g.SetEntry(cr3, k+1, h.link(pre, top))
				r := h.start(cr3, monAll, vasmon.Options{FullSpace: full})
				if h.prot.Protected(pre) != full {
					t.Fatalf("kernel table at Start protected=%v", h.prot.Protected(pre))
				}
				// Link a kernel table with a present leaf through entry 3.
				kt := h.table()
				var e, size uint64
				switch mode {
				case vasmon.Mode32:
					e, size = h.leaf(0x5000, 1), kb4
					h.g.SetEntry(kt, 3, e)
				case vasmon.ModePAE:
					e, size = h.leaf(3*mb2, 2), mb2
					h.g.SetEntry(kt, 3, e)
				case vasmon.Mode4:
					e, size = h.leaf(3*gb1, 3), gb1
					h.g.SetEntry(kt, 3, e)
				case vasmon.Mode5: // PML4Es cannot map: one level down
					sub := h.table()
					e, size = h.leaf(gb1, 3), gb1
					h.g.SetEntry(sub, 0, e)
					h.g.SetEntry(kt, 3, h.link(sub, 4))
				}
				kind := h.set(cr3, k, h.link(kt, top))
				va := kva + 3*mode.EntrySpan(top-1)
				if full {
					wantKind(t, kind, vasmon.WriteRelevant)
					r.expect(ev{VA: va, Old: 0, New: e, Size: size})
					if st := r.Stats(); st.OutOfScope != 0 {
						t.Fatalf("OutOfScope = %d under FullSpace", st.OutOfScope)
					}
				} else {
					wantKind(t, kind, vasmon.WriteIrrelevant)
					h.quiet()
					if h.prot.Protected(kt) {
						t.Fatal("kernel table protected")
					}
					if st := r.Stats(); st.OutOfScope != 1 {
						t.Fatalf("OutOfScope = %d, want 1", st.OutOfScope)
					}
				}
				wantKind(t, h.set(cr3, k, 0), map[bool]vasmon.WriteKind{false: vasmon.WriteIrrelevant, true: vasmon.WriteRelevant}[full])
				if full {
					r.expect(ev{VA: va, Old: e, New: 0, Size: size})
				} else {
					h.quiet()
					if st := r.Stats(); st.OutOfScope != 2 {
						t.Fatalf("OutOfScope = %d, want 2", st.OutOfScope)
					}
				}
				r.stop()
			})
		}
	})
}

// Section 5: under FullSpace, entries pointing to their own table or an
// ancestor's (Windows' PML4 self-map at 0x1ED) are not descended into and
// are counted.
func TestRuleSelfMap(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		cr3 := h.table()
		top := mode.Levels()
		self := mode.Entries(top) - 1
		if mode == vasmon.Mode4 || mode == vasmon.Mode5 {
			self = 0x1ED
		}
		h.g.SetEntry(cr3, self, h.link(cr3, top))
		t1 := h.path(cr3, vaX, 1, false)
		e := h.leaf(0x1234000, 1)
		h.g.SetEntry(t1, h.idx(vaX, 1), e)
		r := h.start(cr3, monAll, vasmon.Options{FullSpace: true})
		if st := r.Stats(); st.SelfRef != 1 {
			t.Fatalf("SelfRef = %d after Start, want 1", st.SelfRef)
		}
		// (The write kinds of self-map writes are not part of the rule.)
		h.set(cr3, self, 0)
		h.quiet()
		h.set(cr3, self, h.link(cr3, top)|vasmon.BitA)
		h.quiet()
		if st := r.Stats(); st.SelfRef != 2 {
			t.Fatalf("SelfRef = %d, want 2", st.SelfRef)
		}
		// Pointing back to an ancestor (the root) from a lower table, and a
		// level-1 table's parent pointing to itself.
		if top > 2 {
			t2 := h.path(cr3, vaX, 2, false)
			h.set(t2, 100, h.link(cr3, 2))
			h.set(t2, 101, h.link(t2, 2))
			h.quiet()
			if st := r.Stats(); st.SelfRef != 4 {
				t.Fatalf("SelfRef = %d, want 4", st.SelfRef)
			}
		}
		// The self-map does not hide the rest of the tree.
		wantKind(t, h.set(t1, h.idx(vaX, 1), 0), vasmon.WriteRelevant)
		r.expect(ev{VA: vaX, Old: e, New: 0, Size: kb4})
		r.stop()
	})
}

// Section 5: IgnoreNullPage reports nothing for mappings at VA 0 (any size),
// and every other address as usual.
func TestRuleIgnoreNullPage(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		cr3 := h.table()
		t1 := h.path(cr3, 0, 1, false)
		r := h.start(cr3, monAll, vasmon.Options{IgnoreNullPage: true})
		e0, e1 := h.leaf(0x7000, 1), h.leaf(0x8000, 1)
		h.set(t1, 0, e0)
		h.quiet()
		wantKind(t, h.set(t1, 1, e1), vasmon.WriteRelevant)
		r.expect(ev{VA: kb4, Old: 0, New: e1, Size: kb4})
		h.set(t1, 0, e0^rwBit)
		h.quiet()
		// A large page at 0 replacing the table: only the 4 KiB page at
		// 0x1000 is reported.
		t2 := h.path(cr3, 0, 2, false)
		big := h.leaf(0, 2)
		tE := h.g.Entry(t2, 0)
		wantKind(t, h.set(t2, 0, big), vasmon.WriteRelevant)
		r.expect(ev{VA: kb4, Old: e1, New: 0, Size: kb4})
		wantKind(t, h.set(t2, 0, tE), vasmon.WriteRelevant)
		r.expect(ev{VA: kb4, Old: 0, New: e1, Size: kb4})
		r.stop() // reports 0x1000 only
	})
}

// buildTree fills a tree under cr3 with leaves of every size, swap entries
// and an aliased level-1 table, and returns it.
func (h *harness) buildTree(cr3 uint64) {
	for i, va := range []uint64{0x1000, 0x2000, 0x40603000, 0x40604000, 0x7FC00000 + 0x3000} {
		t1 := h.path(cr3, va, 1, false)
		h.g.SetEntry(t1, h.idx(va, 1), h.leaf(uint64(i+1)<<20, 1))
		h.g.SetEntry(t1, h.idx(va, 1)+1, 0x5A5A000) // swap entry
	}
	t2 := h.path(cr3, 0x20000000, 2, false)
	h.g.SetEntry(t2, h.idx(0x20000000, 2), h.leaf(0x20000000, 2))
	// Alias: the level-1 table of 0x1000 also linked at 0x60000000.
	a := h.path(cr3, 0x1000, 1, false)
	t2 = h.path(cr3, 0x60000000, 2, false)
	h.g.SetEntry(t2, h.idx(0x60000000, 2), h.link(a, 2))
	if h.mode.Levels() >= 4 {
		t3 := h.path(cr3, 0x8000000000, 3, false)
		h.g.SetEntry(t3, 2, h.leaf(2*gb1, 3))
	}
}

// Section 4: Stop reports every present leaf removed (swap entries are not),
// counting each alias, and leaves no table hooked and no page protected;
// StopCR3 likewise; a stopped root is gone.
func TestRuleStop(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		cr3a, cr3b := h.table(), h.table()
		h.buildTree(cr3a)
		h.buildTree(cr3b)
		ra := h.start(cr3a, monAll, vasmon.Options{})
		rb := h.start(cr3b, vasmon.BitRW, vasmon.Options{})
		if n := len(ra.m); n < 7 {
			t.Fatalf("tree has %d mappings", n)
		}
		ra.stop()
		if h.prot.Count() == 0 {
			t.Fatal("stopping one root unprotected the other's tables")
		}
		if err := h.mon.Stop(ra.Root); !errors.Is(err, vasmon.ErrUnknownRoot) {
			t.Fatalf("second Stop: %v", err)
		}
		// Exact order on a small case: entry order, level by level.
		full := vasmontest.ParamsOf(rb.Root)
		full.Monitored = ^uint64(0)
		before, _ := vasmontest.Walk(h.g.Mem, full)
		if err := h.mon.StopCR3(1, cr3b); err != nil {
			t.Fatal(err)
		}
		got := h.rec.Take(rb)
		if len(got) != len(before) {
			t.Fatalf("StopCR3 reported %d removals for %d mappings", len(got), len(before))
		}
		for _, e := range got {
			if before[vasmontest.Key{VA: e.VA, Size: e.Size}] != e.Old || e.New != 0 {
				t.Fatalf("StopCR3 reported %v", e)
			}
		}
		if h.prot.Count() != 0 || h.mon.Store().Stats().Tables != 0 || h.mon.Store().Stats().Pages != 0 {
			t.Fatalf("after Stop: %d protected, %+v", h.prot.Count(), h.mon.Store().Stats())
		}
		if err := h.mon.StopCR3(1, cr3b); !errors.Is(err, vasmon.ErrUnknownRoot) {
			t.Fatalf("second StopCR3: %v", err)
		}
		// Writes to the former tables are untracked now.
		t1 := h.path(cr3a, 0x1000, 1, false)
		wantKind(t, h.set(t1, 1, 0), vasmon.WriteUntracked)
		if evs := h.rec.Take(ra); len(evs) != 0 {
			t.Fatalf("stopped root reported %v", evs)
		}
		// And the same CR3 can be monitored again.
		h.roots = nil
		ra = h.start(cr3a, monAll, vasmon.Options{})
		ra.stop()

		// Exact order: level by level, entry order within a table.
		h = newHarness(t, mode)
		cr3 := h.table()
		t1 = h.path(cr3, vaX, 1, false)
		a, b := h.leaf(0x1000, 1), h.leaf(0x2000, 1)
		h.g.SetEntry(t1, 9, b)
		h.g.SetEntry(t1, 4, a)
		t2 := h.path(cr3, vaX, 2, false)
		big := h.leaf(0, 2)
		h.g.SetEntry(t2, h.idx(vaX, 2)+1, big)
		r := h.start(cr3, monAll, vasmon.Options{})
		base := uint64(vaX) &^ (uint64(mode.Entries(1))*kb4 - 1)
		size2 := largeLevels(mode)[2]
		if err := h.mon.Stop(r.Root); err != nil {
			t.Fatal(err)
		}
		r.expect(
			ev{VA: base + size2, Old: big, New: 0, Size: size2},
			ev{VA: base + 4*kb4, Old: a, New: 0, Size: kb4},
			ev{VA: base + 9*kb4, Old: b, New: 0, Size: kb4},
		)
	})
}

// Section 4: Dump lists every hooked table: level, GPA, first VA, entries in
// scope, present entries and writes seen on its page; highest level first,
// then by VA.
func TestRuleDump(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		cr3 := h.table()
		if mode == vasmon.ModePAE {
			cr3 += 0x60
		}
		t1 := h.path(cr3, vaX, 1, false)
		h.g.SetEntry(t1, 3, h.leaf(0x1000, 1))
		h.g.SetEntry(t1, 4, 0x77000) // swap: not present
		// Alias: t1 linked a second time, next to the first link.
		t2 := h.path(cr3, vaX, 2, false)
		j := h.idx(vaX, 2)
		h.g.SetEntry(t2, j+1, h.link(t1, 2))
		r := h.start(cr3, monAll, vasmon.Options{})
		wantKind(t, h.set(t1, 5, h.leaf(0x2000, 1)), vasmon.WriteRelevant)
		wantKind(t, h.set(t1, 5, 0), vasmon.WriteRelevant)
		// A partial write leaving memory as it was (so the oracle holds):
		// Dump ends it.
		wantKind(t, h.store(t1+6*uint64(mode.EntryBytes()), 3, 0), vasmon.WritePartial)
		h.rec.Take(r)

		var want []vasmon.TableInfo
		top := mode.Levels()
		span1 := uint64(mode.Entries(1)) * kb4
		for l := top; l >= 2; l-- {
			tl := h.path(cr3, vaX, l, false)
			va := uint64(vaX) &^ (uint64(mode.Entries(l))<<mode.Shift(l) - 1)
			if l == top {
				va = 0
			}
			present := 1
			if l == 2 {
				present = 2
			}
			want = append(want, vasmon.TableInfo{Level: l, GPA: tl, VA: va, Entries: map[bool]int{true: mode.UserEntries(), false: mode.Entries(l)}[l == top], Present: present})
		}
		want = append(want,
			vasmon.TableInfo{Level: 1, GPA: t1, VA: uint64(vaX) &^ (span1 - 1), Entries: mode.Entries(1), Present: 1, Writes: 3},
			vasmon.TableInfo{Level: 1, GPA: t1, VA: uint64(vaX)&^(span1-1) + span1, Entries: mode.Entries(1), Present: 1, Writes: 3})
		if got := h.mon.Dump(r.Root); !slices.Equal(got, want) {
			t.Fatalf("Dump:\n  %+v\nwant\n  %+v", got, want)
		}
		// Another root's tables are not in this root's dump.
		cr3b := h.table()
		rb := h.start(cr3b, monAll, vasmon.Options{FullSpace: true})
		if d := h.mon.Dump(rb.Root); len(d) != 1 || d[0].Entries != mode.Entries(top) || d[0].Present != 0 || d[0].GPA != cr3b {
			t.Fatalf("Dump of an empty FullSpace root: %+v", d)
		}
		if got := h.mon.Dump(r.Root); len(got) != len(want) {
			t.Fatalf("Dump grew to %d tables", len(got))
		}
	})
}

// RemoveVM stops every root of the VM, reporting their mappings removed, and
// forgets it; other VMs (even with the same guest-physical addresses) are
// untouched.
func TestRuleRemoveVM(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		cr3 := h.table()
		h.buildTree(cr3)
		r := h.start(cr3, monAll, vasmon.Options{})
		// VM 2: an identical guest with its own memory and protections.
		g2 := vasmontest.NewGuest(mode, hRAM, hBase)
		prot2 := vasmontest.NewProtections()
		if err := h.mon.AddVM(2, g2.Mem, prot2, 0); err != nil {
			t.Fatal(err)
		}
		cr3v2 := g2.AllocTable()
		if cr3v2 != cr3 {
			t.Fatal("guests differ")
		}
		h2 := &harness{t: t, mode: mode, g: g2}
		h2.buildTree(cr3v2)
		rec2 := vasmontest.NewRecorder()
		r2, err := h.mon.Start(2, cr3v2, mode, monAll, rec2.Callback, "vm2", vasmon.Options{})
		if err != nil {
			t.Fatal(err)
		}
		pages1, pages2 := h.prot.Count(), prot2.Count()
		if pages1 == 0 || pages2 != pages1 {
			t.Fatalf("protected pages: vm1 %d, vm2 %d", pages1, pages2)
		}
		full := vasmontest.ParamsOf(r.Root)
		full.Monitored = ^uint64(0)
		before, _ := vasmontest.Walk(h.g.Mem, full)
		if err := h.mon.RemoveVM(1); err != nil {
			t.Fatal(err)
		}
		got := h.rec.Take(r)
		if len(got) != len(before) {
			t.Fatalf("RemoveVM reported %d removals for %d mappings", len(got), len(before))
		}
		for _, e := range got {
			if before[vasmontest.Key{VA: e.VA, Size: e.Size}] != e.Old || e.New != 0 {
				t.Fatalf("RemoveVM reported %v", e)
			}
		}
		if h.prot.Count() != 0 || prot2.Count() != pages2 || len(rec2.Peek("vm2")) != 0 {
			t.Fatalf("after RemoveVM(1): vm1 %d pages, vm2 %d pages, vm2 callbacks %v", h.prot.Count(), prot2.Count(), rec2.Peek("vm2"))
		}
		if !r.Stopped() || h.mon.VM(1) != nil || h.mon.Root(1, cr3) != nil {
			t.Fatal("VM 1 still known")
		}
		if _, err := h.mon.Start(1, cr3, mode, monAll, h.rec.Callback, nil, vasmon.Options{}); !errors.Is(err, vasmon.ErrUnknownVM) {
			t.Fatalf("Start on a removed VM: %v", err)
		}
		if err := h.mon.RemoveVM(1); !errors.Is(err, vasmon.ErrUnknownVM) {
			t.Fatalf("second RemoveVM: %v", err)
		}
		t1 := h.path(cr3, 0x1000, 1, false)
		wantKind(t, h.set(t1, 1, 0), vasmon.WriteUntracked)
		// VM 2 still works.
		t1v2 := h2.path(cr3v2, 0x1000, 1, false)
		w := g2.SetEntry(t1v2, 1, 0)
		if k, err := h.mon.Write(2, w); err != nil || k != vasmon.WriteRelevant {
			t.Fatalf("write to VM 2: %v %v", k, err)
		}
		// The table is aliased at 0x60000000 (buildTree).
		if evs := rec2.Take("vm2"); len(evs) != 2 || evs[0].VA+evs[1].VA != 0x1000+0x60001000 || evs[0].New|evs[1].New != 0 {
			t.Fatalf("VM 2 reported %v", evs)
		}
		if err := h.mon.RemoveVM(2); err != nil || prot2.Count() != 0 || !r2.Stopped() {
			t.Fatalf("RemoveVM(2): %v, %d pages", err, prot2.Count())
		}
		if len(h.prot.Errors)+len(prot2.Errors) != 0 {
			t.Fatal(h.prot.Errors, prot2.Errors)
		}
	})
}

// The monitor's errors, and that none leaves state behind.
func TestRuleErrors(t *testing.T) {
	h := newHarness(t, vasmon.Mode4)
	cb := h.rec.Callback
	cr3 := h.table()
	mon := h.mon
	if _, err := mon.Start(9, cr3, vasmon.Mode4, 0, cb, nil, vasmon.Options{}); !errors.Is(err, vasmon.ErrUnknownVM) {
		t.Fatalf("unknown VM: %v", err)
	}
	for _, m := range []vasmon.Mode{0, vasmon.Mode5 + 1, 255} {
		if _, err := mon.Start(1, cr3, m, 0, cb, nil, vasmon.Options{}); !errors.Is(err, vasmon.ErrBadMode) {
			t.Fatalf("mode %d: %v", m, err)
		}
	}
	if _, err := mon.Start(1, cr3, vasmon.Mode4, 0, nil, nil, vasmon.Options{}); !errors.Is(err, vasmon.ErrNilCallback) {
		t.Fatalf("nil callback: %v", err)
	}
	for _, c := range []uint64{hRAM, hRAM + 0x1000, 1 << 51} {
		if _, err := mon.Start(1, c, vasmon.Mode4, 0, cb, nil, vasmon.Options{}); !errors.Is(err, vasmon.ErrRootOutside) {
			t.Fatalf("root %#x: %v", c, err)
		}
	}
	// A PAE PDPT in the last 32 bytes of RAM is inside it.
	hp := newHarness(t, vasmon.ModePAE)
	if _, err := hp.mon.Start(1, hRAM-32, vasmon.ModePAE, 0, cb, nil, vasmon.Options{}); err != nil {
		t.Fatalf("PDPT at the end of RAM: %v", err)
	}
	if err := mon.AddVM(1, h.g.Mem, h.prot, 0); !errors.Is(err, vasmon.ErrVMExists) {
		t.Fatalf("duplicate VM: %v", err)
	}
	if err := mon.AddVM(3, nil, h.prot, 0); err == nil {
		t.Fatal("VM without memory accepted")
	}
	if err := mon.AddVM(3, h.g.Mem, nil, 0); err == nil {
		t.Fatal("VM without protector accepted")
	}
	// A root whose page cannot be protected.
	h.prot.FailProtect = map[uint64]bool{cr3: true}
	if _, err := mon.Start(1, cr3, vasmon.Mode4, 0, cb, nil, vasmon.Options{}); err == nil {
		t.Fatal("Start with a failing protector succeeded")
	}
	h.prot.FailProtect = nil
	if h.prot.Count() != 0 || mon.Store().Stats().Tables != 0 || mon.Root(1, cr3) != nil || mon.VM(1).Tables() != 0 {
		t.Fatal("failed Starts left state behind")
	}
	h.quiet()

	r := h.start(cr3, monAll, vasmon.Options{})
	if _, err := mon.Start(1, cr3, vasmon.Mode4, 0, cb, nil, vasmon.Options{}); !errors.Is(err, vasmon.ErrRootExists) {
		t.Fatalf("duplicate root: %v", err)
	}
	for _, size := range []uint8{0, 9, 16, 255} {
		if _, err := mon.Write(1, vasmon.Write{GPA: cr3, Size: size}); !errors.Is(err, vasmon.ErrBadWrite) {
			t.Fatalf("write size %d: %v", size, err)
		}
	}
	if err := mon.StopCR3(1, cr3+0x1000); !errors.Is(err, vasmon.ErrUnknownRoot) {
		t.Fatalf("unknown CR3: %v", err)
	}
	if err := mon.StopCR3(7, cr3); !errors.Is(err, vasmon.ErrUnknownRoot) {
		t.Fatalf("unknown VM's CR3: %v", err)
	}
	if err := mon.Stop(nil); !errors.Is(err, vasmon.ErrUnknownRoot) {
		t.Fatalf("nil root: %v", err)
	}
	if err := mon.RemoveVM(7); !errors.Is(err, vasmon.ErrUnknownVM) {
		t.Fatalf("RemoveVM of an unknown VM: %v", err)
	}
	// A root of another monitor is unknown here.
	if err := hp.mon.Stop(r.Root); !errors.Is(err, vasmon.ErrUnknownRoot) {
		t.Fatalf("foreign root: %v", err)
	}
	h.quiet()

	// Re-entrant calls from a callback.
	other := h.table()
	var errs []error
	cb2 := func(ctx any, va, old, new, size uint64) {
		_, err := mon.Write(1, vasmon.Write{GPA: cr3, Size: 8})
		errs = append(errs, err)
		_, err = mon.Start(1, other, vasmon.Mode4, 0, cb, nil, vasmon.Options{})
		errs = append(errs, err)
		errs = append(errs, mon.Stop(r.Root), mon.StopCR3(1, cr3), mon.RemoveVM(1), mon.RemoveVM(9), mon.AddVM(9, h.g.Mem, h.prot, 0))
		h.rec.Callback(ctx, va, old, new, size)
	}
	t1 := h.path(cr3, vaX, 1, true)
	r2 := &hroot{h: h, oracle: true}
	cr3b := h.table()
	root2, err := mon.Start(1, cr3b, vasmon.Mode4, monAll, cb2, r2, vasmon.Options{})
	if err != nil {
		t.Fatal(err)
	}
	r2.Root = root2
	r2.m = h.walk(r2)
	h.roots = append(h.roots, r2)
	t2 := h.path(cr3b, vaX, 1, true)
	e := h.leaf(0x1000, 1)
	checkErrs := func() {
		t.Helper()
		if len(errs) != 7 {
			t.Fatalf("callback made %d calls", len(errs))
		}
		for _, err := range errs {
			if !errors.Is(err, vasmon.ErrReentrant) {
				t.Fatalf("re-entrant call returned %v", err)
			}
		}
		if mon.VM(9) != nil {
			t.Fatal("VM added from a callback")
		}
	}
	wantKind(t, h.set(t2, 1, e), vasmon.WriteRelevant)
	checkErrs()
	r2.expect(ev{VA: vaX&^(mb2-1) | kb4, Old: 0, New: e, Size: kb4})
	// The monitor works normally afterwards.
	wantKind(t, h.set(t1, 2, e), vasmon.WriteRelevant)
	r.expect(ev{VA: vaX&^(mb2-1) | 2*kb4, Old: 0, New: e, Size: kb4})
	r.stop()
	errs = nil
	r2.stop() // its callback runs while r is already stopped
	checkErrs()
	if h.prot.Count() != 0 {
		t.Fatal("pages left protected")
	}
}

// Section 5: one page that is a table of two roots (and twice a table of
// one root) is protected once, reported through every occurrence, and
// unprotected only when its last table goes.
func TestRuleSharedPage(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		cr3a, cr3b := h.table(), h.table()
		shared := h.table()
		const vaA, vaB = 0x40800000, 0x00C00000
		span1 := uint64(mode.Entries(1)) * kb4
		pa := h.path(cr3a, vaA, 2, false)
		pb := h.path(cr3b, vaB, 2, false)
		h.g.SetEntry(pa, h.idx(vaA, 2), h.link(shared, 2))
		h.g.SetEntry(pb, h.idx(vaB, 2), h.link(shared, 2))
		h.g.SetEntry(pb, h.idx(vaB, 2)+1, h.link(shared, 2)) // twice in root b
		ra := h.start(cr3a, rwBit|frameMask, vasmon.Options{})
		rb := h.start(cr3b, usBit|frameMask, vasmon.Options{})
		if !h.prot.Protected(shared) || h.prot.Protects != len(h.prot.Pages()) {
			t.Fatalf("%d protects for %d pages", h.prot.Protects, len(h.prot.Pages()))
		}
		e := h.leaf(0x9000, 1)
		wantKind(t, h.set(shared, 6, e), vasmon.WriteRelevant)
		ra.take(true, ev{VA: vaA + 6*kb4, Old: 0, New: e, Size: kb4})
		rb.expectSet(ev{VA: vaB + 6*kb4, Old: 0, New: e, Size: kb4}, ev{VA: vaB + span1 + 6*kb4, Old: 0, New: e, Size: kb4})
		// Per-root monitored bits: RW for a, US for b.
		wantKind(t, h.set(shared, 6, e^rwBit), vasmon.WriteRelevant)
		ra.expect(ev{VA: vaA + 6*kb4, Old: e, New: e ^ rwBit, Size: kb4})
		rb.expect()
		wantKind(t, h.set(shared, 6, e^rwBit^usBit), vasmon.WriteRelevant)
		ra.take(true)
		rb.expectSet(ev{VA: vaB + 6*kb4, Old: e ^ rwBit, New: e ^ rwBit ^ usBit, Size: kb4}, ev{VA: vaB + span1 + 6*kb4, Old: e ^ rwBit, New: e ^ rwBit ^ usBit, Size: kb4})
		e = e ^ rwBit ^ usBit
		// Unlink from a: still protected for b's two tables.
		wantKind(t, h.set(pa, h.idx(vaA, 2), 0), vasmon.WriteRelevant)
		ra.expect(ev{VA: vaA + 6*kb4, Old: e, New: 0, Size: kb4})
		rb.expect()
		if !h.prot.Protected(shared) {
			t.Fatal("shared page unprotected while b uses it")
		}
		wantKind(t, h.set(pb, h.idx(vaB, 2), 0), vasmon.WriteRelevant)
		rb.expect(ev{VA: vaB + 6*kb4, Old: e, New: 0, Size: kb4})
		if !h.prot.Protected(shared) {
			t.Fatal("shared page unprotected while b's alias uses it")
		}
		rb.stop()
		if h.prot.Protected(shared) {
			t.Fatal("shared page protected after its last table went")
		}
		ra.stop()
		if h.prot.Protects != h.prot.Unprotects {
			t.Fatalf("%d protects, %d unprotects", h.prot.Protects, h.prot.Unprotects)
		}
	})
}

// Section 1, rules 1-2, with one write completing two entries: the unlink
// of a table T (the last entry of its parent's page) and a link in T's first
// entry (T is the next page). T's subtree is reported removed; the table
// linked in T, no longer reachable, is neither hooked nor reported.
func TestRuleUnlinkAndLinkInOneWrite(t *testing.T) {
	for _, mode := range []vasmon.Mode{vasmon.ModePAE, vasmon.Mode4, vasmon.Mode5} {
		t.Run(mode.String(), func(t *testing.T) {
			h := newHarness(t, mode)
			cr3 := h.table()
			var q uint64
			if mode == vasmon.ModePAE {
				q = h.path(cr3, 0x40000000, 2, false) // a page directory
			} else {
				q = h.path(cr3, 0, 3, false)
			}
			tt := h.table()
			if tt != q+vasmon.PageSize {
				t.Fatal("pages not adjacent")
			}
			lq := 3
			if mode == vasmon.ModePAE {
				lq = 2
			}
			last := mode.Entries(lq) - 1
			h.g.SetEntry(q, last, h.link(tt, lq))
			e := h.leaf(0x5000, 1)
			if lq == 3 {
				e = h.leaf(0x400000, 2)
			}
			h.g.SetEntry(tt, 1, e)
			x := h.table() // prefilled, to be linked in tt[0]
			h.g.SetEntry(x, 0, h.leaf(0x7000, 1))
			r := h.start(cr3, monAll, vasmon.Options{})
			va := uint64(last) << mode.Shift(lq)
			if mode == vasmon.ModePAE {
				va += 0x40000000
			}
			link := h.link(x, lq-1)
			// The low half of q[last] and the high half of tt[0] first...
			wantKind(t, h.store(q+vasmon.PageSize-8, 4, 0), vasmon.WritePartial)
			wantKind(t, h.store(tt+4, 4, link>>32), vasmon.WritePartial)
			h.silent()
			// ...then one store completes both.
			wantKind(t, h.store(q+vasmon.PageSize-4, 8, link<<32), vasmon.WriteRelevant)
			// In a level-1 table the new entry would be a leaf; but the one
			// store unlinked tt as it wrote it, so tt never mapped it: only
			// tt's old mapping is reported removed (no phantom).
			removedE := ev{VA: va + mode.EntrySpan(lq-1), Old: e, New: 0, Size: mode.EntrySpan(lq - 1)}
			r.expect(removedE)
			if h.prot.Protected(x) || h.prot.Protected(tt) {
				t.Fatal("unreachable table protected")
			}
			r.stop()
		})
	}
}

// Versions (Write.Ver): a write stamped before the page's last read is
// already in the shadow and is dropped, so a queued event that predates an
// unhook and re-hook of its page cannot move the entry back in time; a
// write stamped after the read is applied, and an unstamped one (Ver 0)
// is never stale.
func TestStaleWrites(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		cr3 := h.table()
		t1 := h.path(cr3, vaX, 1, false)
		i := h.idx(vaX, 1)
		e1, e2 := h.leaf(0x1234000, 1), h.leaf(0x5678000, 1)
		h.g.SetEntry(t1, i, e1)
		r := h.start(cr3, monAll, vasmon.Options{})
		// A write trapped, then left queued while the root is stopped...
		queued := h.g.SetEntry(t1, i, 0)
		if queued.Ver == 0 {
			t.Fatal("a write of a protected page was not stamped")
		}
		h.g.SetEntry(t1, i, e1) // (memory as Stop will find it)
		r.stop()
		// ...the guest writes the unprotected page, the root starts again
		// and reads e2.
		if w := h.g.SetEntry(t1, i, e2); w.Ver != 0 {
			t.Fatal("a write of an unprotected page was stamped")
		}
		before := h.mon.Store().Stats().StaleWrites
		r2 := h.start(cr3, monAll, vasmon.Options{})
		// The queued write arrives: dropped, the shadow keeps e2.
		wantKind(t, h.write(queued), vasmon.WriteUntracked) // as if its page were not hooked
		if n := h.mon.Store().Stats().StaleWrites - before; n != 1 {
			t.Fatalf("stale writes counted: %d, want 1", n)
		}
		h.quiet()
		// A write stamped after the read is applied, even with the same
		// value the stale one had.
		w := h.g.SetEntry(t1, i, 0)
		wantKind(t, h.write(w), vasmon.WriteRelevant)
		r2.expect(ev{VA: vaX, Old: e2, New: 0, Size: kb4})
		r2.stop()

		// Without versions, stamps are ignored: nothing is stale.
		hu := newHarnessMem(t, mode, false)
		cr3 = hu.table()
		t1 = hu.path(cr3, vaX, 1, false)
		hu.g.SetEntry(t1, i, e1)
		ru := hu.start(cr3, monAll, vasmon.Options{})
		w = hu.g.SetEntry(t1, i, 0)
		w.Ver = 1
		wantKind(t, hu.write(w), vasmon.WriteRelevant)
		ru.expect(ev{VA: vaX, Old: e1, New: 0, Size: kb4})
		ru.stop()
	})
}

// Write floods (issue 19, flood.go): a page of level-1 tables written more
// than Flood.Writes times within Flood.Window is no longer protected; it is
// read when an event comes Flood.Interval after its last read, and at a
// Flush, which reports what changed (the oracle holds at quiescent points);
// after Flood.Quiet reads that find it unchanged it is protected again. A
// page that holds a table above level 1 is never polled.
func TestRuleWriteFlood(t *testing.T) {
	forModes(t, func(t *testing.T, mode vasmon.Mode) {
		h := newHarness(t, mode)
		h.mon.Store().Flood = vasmon.FloodPolicy{Writes: 100, Window: 1_000_000, Interval: 1000, Quiet: 3}
		cr3 := h.table()
		t1 := h.path(cr3, vaX, 1, false)
		t2 := h.path(cr3, vaX, 2, false)
		other := h.path(cr3, vaX+uint64(mode.Entries(1))*kb4, 1, false)
		i := h.idx(vaX, 1)
		r := h.start(cr3, monAll, vasmon.Options{})
		vm := h.mon.VM(1)
		var trap int64
		write := func(t uint64, i int, v uint64) vasmon.WriteKind {
			w := h.g.SetEntry(t, i, v)
			trap += 10
			w.Trap = trap
			if w.Ver == 0 {
				return vasmon.WriteUntracked // not protected: not trapped, no event
			}
			return h.write(w)
		}
		for k := 0; k < 100; k++ {
			write(t1, i, h.leaf(uint64(k+1)<<12, 1))
		}
		r.take(true, h.rec.Peek(r)...)
		if vm.Flooded() != 1 || h.prot.Protected(t1) {
			t.Fatalf("after 100 writes in a window: %d pages flooded, protected %v", vm.Flooded(), h.prot.Protected(t1))
		}
		// The page of a table above level 1 keeps trapping.
		for k := 0; k < 200; k++ {
			write(t2, h.idx(vaX, 2)+5, uint64(k%2)*h.leaf(0x40000000, 2))
		}
		r.take(true, h.rec.Peek(r)...)
		if vm.Flooded() != 1 || !h.prot.Protected(t2) {
			t.Fatalf("a page directory flooded: %d, protected %v", vm.Flooded(), h.prot.Protected(t2))
		}
		// Writes of the flooded page no longer trap; an event of the store
		// an interval later reads it and reports the difference.
		last := h.leaf(0x77000, 1)
		if write(t1, i, last) != vasmon.WriteUntracked || write(t1, i+1, last) != vasmon.WriteUntracked {
			t.Fatal("a write of the flooded page trapped")
		}
		trap += 1000
		write(other, 3, h.leaf(0x3000, 1))
		r.take(false, ev{VA: vaX, Old: h.leaf(100<<12, 1), New: last, Size: kb4}, ev{VA: vaX + kb4, Old: 0, New: last, Size: kb4},
			ev{VA: (vaX+uint64(mode.Entries(1))*kb4)&^(uint64(mode.Entries(1))*kb4-1) + 3*kb4, Old: 0, New: h.leaf(0x3000, 1), Size: kb4})
		// Quiet: after 3 reads that find nothing new, trapped again.
		for k := 0; k < 4 && vm.Flooded() > 0; k++ {
			trap += 1000
			write(other, 4, h.leaf(uint64(k+5)<<12, 1))
		}
		r.take(true, h.rec.Peek(r)...)
		if vm.Flooded() != 0 || !h.prot.Protected(t1) {
			t.Fatalf("quiet page: %d flooded, protected %v", vm.Flooded(), h.prot.Protected(t1))
		}
		if st := h.mon.Store().Stats(); st.Floods != 1 || st.Polls < 4 {
			t.Fatalf("stats %+v", st)
		}
		h.verify() // trapped again: the oracle, the tables and protections hold
		r.stop()
	})
}
