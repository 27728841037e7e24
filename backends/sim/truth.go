package sim

import (
	"fmt"
	"sync"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/vasmon"
)

// truth is the ground truth of a VM's run, kept for tests (export_test.go)
// so that every callback can be checked on its own (SEMANTICS.md section 6,
// "No phantoms"): the place of every table linked into the user half of a
// process's tree now, the pages that ever were such tables, and every leaf
// entry some root ever held (masked by the monitored bits). It follows the
// stores themselves, not walks: each store is looked up by its table's
// place, before it lands in memory (so that a host that reads the store
// finds it recorded), under one lock per VM.
type truth struct {
	vm     *vm
	mu     sync.Mutex
	mask   uint64                        // the monitored bits and P
	roots  uint64                        // root incarnations handed out
	places map[uint64]place              // linked tables by address (a PAE root by its 32-byte slot)
	tables map[uint64]bool               // pages that were tables of a root at some instant
	ever   map[leafKey]bool              // leaf entries some root held at some instant
	infos  map[*backends.RootInfo]uint64 // incarnation of each monitored root
	bad    []uint64                      // pages protected that never were tables of a root
	// live are the incarnations monitored now (from Start's return to
	// Stop's call); windows counts the guest's stores into a table linked
	// into one of them that did not trap (their page not yet protected:
	// the host had not yet seen the link), the first in window.
	live    map[uint64]bool
	windows uint64
	window  string
}

// place is where a table is linked: its root's incarnation (a root table
// freed and reused is another root), the first VA it maps and its level.
type place struct {
	root, va uint64
	level    int
}

type leafKey struct{ root, va, size, e uint64 }

func newTruth(v *vm) *truth {
	return &truth{vm: v, mask: ^uint64(0), places: map[uint64]place{}, tables: map[uint64]bool{},
		ever: map[leafKey]bool{}, infos: map[*backends.RootInfo]uint64{}, live: map[uint64]bool{}}
}

// monitor records that the root of info is monitored from now on (on), or
// no longer (Stop is called).
func (t *truth) monitor(info *backends.RootInfo, on bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if inc, ok := t.infos[info]; ok {
		if on {
			t.live[inc] = true
		} else {
			delete(t.live, inc)
		}
	}
}

// newRoot records a new root table (the CR3 of a new process).
func (t *truth) newRoot(root uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.roots++
	t.places[root] = place{root: t.roots, level: t.vm.mode.Levels()}
	t.tables[root&^(vasmon.PageSize-1)] = true
}

// freeRoot records that a root table, its user half torn down, is freed.
func (t *truth) freeRoot(root uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.places, root)
}

// started records the callback context of the root at root.
func (t *truth) started(info *backends.RootInfo, root uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.infos[info] = t.places[root].root
}

// protect checks a page the host protects.
func (t *truth) protect(gpa uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.tables[gpa] {
		t.bad = append(t.bad, gpa)
	}
}

// existed reports whether the root of info held the leaf e at va (of size
// bytes) at some instant.
func (t *truth) existed(info *backends.RootInfo, va, size, e uint64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	inc, ok := t.infos[info]
	return ok && t.ever[leafKey{inc, va, size, e & t.mask}]
}

// placeOf returns the place of the table holding the entry at ea, and the
// table's address.
func (t *truth) placeOf(ea uint64) (place, uint64, bool) {
	m := t.vm.mode
	if m == vasmon.ModePAE {
		if p, ok := t.places[ea&^(pdptSize-1)]; ok && p.level == m.Levels() {
			return p, ea &^ (pdptSize - 1), true
		}
	}
	base := ea &^ (vasmon.PageSize - 1)
	p, ok := t.places[base]
	if !ok || m == vasmon.ModePAE && p.level == m.Levels() {
		return place{}, 0, false
	}
	return p, base, true
}

// store records a store of size bytes of v at gpa, within the entry whose
// value is old, made by c: the leaf it makes, the table it links (and the
// entries that table holds already), the table it unlinks. unseen says the
// store does not trap: made into a table of a monitored root, it is a
// window.
func (t *truth) store(c *vcpu, gpa uint64, size int, v, old uint64, unseen bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	m, esz := t.vm.mode, uint64(t.vm.esz)
	ea := gpa &^ (esz - 1)
	p, base, ok := t.placeOf(ea)
	if !ok {
		return
	}
	i := int((ea - base) / esz)
	if p.level == m.Levels() && i >= m.UserEntries() {
		return // the kernel half
	}
	if unseen && t.live[p.root] {
		if t.windows++; t.windows == 1 {
			t.window = fmt.Sprintf("store of %d bytes %#x at %#x (entry %d of the level-%d table at %#x, VA %#x) while the table's page was not protected",
				size, v, gpa, i, p.level, base, m.EntryVA(p.va, p.level, i))
		}
	}
	sh := 8 * (gpa - ea)
	mask := ^uint64(0)
	if size < 8 {
		mask = uint64(1)<<(8*size) - 1
	}
	e := old&^(mask<<sh) | (v&mask)<<sh
	t.entry(c, p, i, old, e)
}

// entry records that entry i of the table at place p changes from old to e.
func (t *truth) entry(c *vcpu, p place, i int, old, e uint64) {
	m := t.vm.mode
	va := m.EntryVA(p.va, p.level, i)
	ok, nk := m.Classify(old, p.level), m.Classify(e, p.level)
	same := ok == vasmon.KindTable && nk == vasmon.KindTable && m.TableAddr(old) == m.TableAddr(e)
	if ok == vasmon.KindTable && !same {
		t.unlink(c, m.TableAddr(old), place{p.root, va, p.level - 1})
	}
	switch {
	case nk == vasmon.KindTable && !same:
		t.link(c, m.TableAddr(e), place{p.root, va, p.level - 1})
	case nk == vasmon.KindLeaf:
		t.ever[leafKey{p.root, va, m.EntrySpan(p.level), e & t.mask}] = true
	}
}

// link records that the table at addr is linked at place p, with the
// entries it holds already (a THP split fills its table before linking it).
func (t *truth) link(c *vcpu, addr uint64, p place) {
	t.places[addr] = p
	t.tables[addr&^(vasmon.PageSize-1)] = true
	c.each(addr, t.vm.mode.Entries(p.level), func(i int, _, e uint64) bool {
		t.entry(c, p, i, 0, e)
		return true
	})
}

// unlink records that the table at addr, linked at place p, is unlinked
// (with the tables it links, if any are left).
func (t *truth) unlink(c *vcpu, addr uint64, p place) {
	if t.places[addr] != p {
		return
	}
	delete(t.places, addr)
	if p.level == 1 {
		return
	}
	m := t.vm.mode
	c.each(addr, m.Entries(p.level), func(i int, _, e uint64) bool {
		if m.Classify(e, p.level) == vasmon.KindTable {
			t.unlink(c, m.TableAddr(e), place{p.root, m.EntryVA(p.va, p.level, i), p.level - 1})
		}
		return true
	})
}
