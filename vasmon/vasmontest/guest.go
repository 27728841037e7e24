package vasmontest

import (
	"fmt"
	"slices"
	"sync"

	"github.com/vasengine/vasengine/guestmem"
	"github.com/vasengine/vasengine/vasmon"
)

// Protections is a vasmon.Protector that records which pages are protected
// and fails the test-visible invariants: protecting a protected page or
// unprotecting an unprotected one is counted as an error.
type Protections struct {
	mu    sync.Mutex
	pages map[uint64]bool
	// Ver, if set, is kept up to date: the protected bit of each page.
	Ver        *guestmem.Versions
	Errors     []string
	Protects   int
	Unprotects int
	// FailProtect makes Protect fail for these pages.
	FailProtect map[uint64]bool
}

// NewProtections returns an empty recorder.
func NewProtections() *Protections { return &Protections{pages: make(map[uint64]bool)} }

// Protect implements vasmon.Protector.
func (p *Protections) Protect(gpa uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.FailProtect[gpa] {
		return fmt.Errorf("protect %#x: refused", gpa)
	}
	if gpa%vasmon.PageSize != 0 {
		p.Errors = append(p.Errors, fmt.Sprintf("protect of unaligned %#x", gpa))
	}
	if p.pages[gpa] {
		p.Errors = append(p.Errors, fmt.Sprintf("page %#x protected twice", gpa))
	}
	p.pages[gpa] = true
	p.Protects++
	if p.Ver != nil {
		p.Ver.SetProtected(gpa, true)
	}
	return nil
}

// Unprotect implements vasmon.Protector.
func (p *Protections) Unprotect(gpa uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.pages[gpa] {
		p.Errors = append(p.Errors, fmt.Sprintf("page %#x unprotected while not protected", gpa))
	}
	delete(p.pages, gpa)
	p.Unprotects++
	if p.Ver != nil {
		p.Ver.SetProtected(gpa, false)
	}
	return nil
}

// Protected reports whether gpa's page is protected.
func (p *Protections) Protected(gpa uint64) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pages[gpa&^(vasmon.PageSize-1)]
}

// Pages returns the protected pages, sorted.
func (p *Protections) Pages() []uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]uint64, 0, len(p.pages))
	for g := range p.pages {
		out = append(out, g)
	}
	slices.Sort(out)
	return out
}

// Count returns the number of protected pages.
func (p *Protections) Count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.pages)
}

// Guest is a small in-memory guest: sparse RAM with the version word of
// every page, a bump allocator of table pages and a page-table builder for
// one paging mode. Its writes go to memory and are returned as vasmon.Write
// events carrying the old entry value; a write of a protected page (see
// Protections.Ver) is trapped: it is stamped on the page's version word.
type Guest struct {
	Mem  *guestmem.Memory
	Ver  *guestmem.Versions
	Mode vasmon.Mode
	next uint64
	free []uint64
}

// maxVersioned is the largest RAM a Guest keeps version words for (they
// cost 8 bytes per page); a larger, sparse guest's memory is not versioned.
const maxVersioned = 1 << 36

// NewGuest returns a guest with ramBytes of RAM; tables are allocated from
// the page at tableBase upwards.
func NewGuest(mode vasmon.Mode, ramBytes, tableBase uint64) *Guest {
	g := &Guest{Mem: guestmem.New(ramBytes), Mode: mode, next: tableBase}
	if ramBytes <= maxVersioned {
		g.Ver = guestmem.NewVersions(ramBytes)
	}
	return g
}

// VersionedMemory is guest memory with the version words of its pages
// (vasmon.Versioned).
type VersionedMemory struct {
	*guestmem.Memory
	V *guestmem.Versions
}

// Versions implements vasmon.Versioned.
func (m VersionedMemory) Versions() *guestmem.Versions { return m.V }

// Memory returns the guest's memory as a monitor reads it: versioned, unless
// the guest is too large to keep version words.
func (g *Guest) Memory() vasmon.Memory {
	if g.Ver == nil {
		return g.Mem
	}
	return VersionedMemory{g.Mem, g.Ver}
}

// NewProtections returns a protection recorder that keeps the guest's
// version words.
func (g *Guest) NewProtections() *Protections {
	p := NewProtections()
	p.Ver = g.Ver
	return p
}

// AllocTable returns a zeroed page for a table (reusing freed pages first).
func (g *Guest) AllocTable() uint64 {
	if n := len(g.free); n > 0 {
		p := g.free[n-1]
		g.free = g.free[:n-1]
		_ = g.Mem.Zero(p)
		return p
	}
	p := g.next
	g.next += vasmon.PageSize
	if !g.Mem.InRAM(p, vasmon.PageSize) {
		panic("vasmontest: guest out of table pages")
	}
	return p
}

// FreeTable returns a page to the allocator.
func (g *Guest) FreeTable(p uint64) { g.free = append(g.free, p) }

// Entry reads entry i of the table at gpa.
func (g *Guest) Entry(table uint64, i int) uint64 {
	esz := g.Mode.EntryBytes()
	v, err := g.Mem.ReadUint(table+uint64(i*esz), esz)
	if err != nil {
		panic(err)
	}
	return v
}

// Store writes size bytes of v at gpa (anywhere in RAM) and returns the
// write event a backend would report: Old is the whole entry holding gpa
// before the store; a store to a protected page is stamped on its version
// word (both pages' for a store that crosses a page boundary) before it
// reaches memory (Write.Stamped).
func (g *Guest) Store(gpa uint64, size int, v uint64, rip uint64) vasmon.Write {
	esz := uint64(g.Mode.EntryBytes())
	eaddr := gpa &^ (esz - 1)
	old, err := g.Mem.ReadUint(eaddr, int(esz))
	if err != nil {
		panic(err)
	}
	last := gpa + uint64(size) - 1
	var ver, ver2 uint32
	if g.Ver != nil && g.Ver.Protected(gpa) {
		ver = g.Ver.BeginWrite(gpa)
	}
	split := last/vasmon.PageSize != gpa/vasmon.PageSize
	if split && g.Ver != nil && g.Ver.Protected(last) {
		ver2 = g.Ver.BeginWrite(last)
	}
	if _, err := g.Mem.WriteUint(gpa, size, v); err != nil {
		panic(err)
	}
	if ver != 0 {
		g.Ver.EndWrite(gpa)
	}
	if ver2 != 0 {
		g.Ver.EndWrite(last)
	}
	return vasmon.Write{GPA: gpa, Data: v, Size: uint8(size), Old: old, HasOld: true, RIP: rip, Ver: ver, Ver2: ver2, Stamped: true}
}

// SetEntry writes entry i of the table at gpa in one store of the entry's
// size and returns the event.
func (g *Guest) SetEntry(table uint64, i int, v uint64) vasmon.Write {
	esz := g.Mode.EntryBytes()
	return g.Store(table+uint64(i*esz), esz, v, 0)
}

// Map maps va to frame with a leaf of the given level (1 = 4 KiB, 2 =
// 2/4 MiB, 3 = 1 GiB) and flags, creating missing tables under root, and
// returns the write events in the order made. Existing leaves on the way are
// not split: Map panics if it meets one.
func (g *Guest) Map(root uint64, va uint64, level int, frame, flags uint64) []vasmon.Write {
	m := g.Mode
	var evs []vasmon.Write
	table := m.RootGPA(root)
	for l := m.Levels(); l > level; l-- {
		i := int(va>>m.Shift(l)) & (m.Entries(l) - 1)
		if l == m.Levels() {
			i = int(va>>m.Shift(l)) & (m.Entries(l) - 1)
		}
		e := g.Entry(table, i)
		switch m.Classify(e, l) {
		case vasmon.KindTable:
			table = m.TableAddr(e)
			continue
		case vasmon.KindLeaf:
			panic(fmt.Sprintf("vasmontest: Map through a leaf at level %d", l))
		}
		t := g.AllocTable()
		flagsT := vasmon.BitP | vasmon.BitRW | vasmon.BitUS
		if m == vasmon.ModePAE && l == 3 {
			flagsT = vasmon.BitP // PDPTEs have RW/US reserved
		}
		evs = append(evs, g.SetEntry(table, i, t|flagsT))
		table = t
	}
	i := int(va>>m.Shift(level)) & (m.Entries(level) - 1)
	e := frame | flags | vasmon.BitP
	if level > 1 {
		e |= vasmon.BitPS
	}
	evs = append(evs, g.SetEntry(table, i, e))
	return evs
}

// NewRoot allocates an empty root table and returns its CR3. For PAE the
// root is placed at offset off (a multiple of 32) of a fresh page.
func (g *Guest) NewRoot(off uint64) uint64 {
	return g.AllocTable() + off
}
