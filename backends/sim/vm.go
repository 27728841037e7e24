package sim

import (
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/vasengine/vasengine/guestmem"
	"github.com/vasengine/vasengine/vasmon"
)

// protector is a VM's emulated EPT write protection: the protected bit of
// each page's version word (guestmem.Versions), set and cleared by the host
// and tested by every simulated store. The engine reads the same words
// (memory.Versions): they prove its reads of guest memory against the
// stores made meanwhile.
type protector struct {
	ver   *guestmem.Versions
	n     atomic.Int64
	truth *truth // tests: the pages that were tables (nil: not kept)
}

func (p *protector) check(gpa uint64) error {
	if gpa/vasmon.PageSize >= uint64(p.ver.Pages()) {
		return fmt.Errorf("sim: page %#x is outside guest RAM", gpa)
	}
	return nil
}

// Protect implements vasmon.Protector. Protecting a protected page changes
// nothing.
func (p *protector) Protect(gpa uint64) error {
	if err := p.check(gpa); err != nil {
		return err
	}
	if p.truth != nil {
		p.truth.protect(gpa)
	}
	if !p.ver.Protected(gpa) {
		p.ver.SetProtected(gpa, true)
		p.n.Add(1)
	}
	return nil
}

// Unprotect implements vasmon.Protector.
func (p *protector) Unprotect(gpa uint64) error {
	if err := p.check(gpa); err != nil {
		return err
	}
	if p.ver.Protected(gpa) {
		p.ver.SetProtected(gpa, false)
		p.n.Add(-1)
	}
	return nil
}

// memory is a VM's guest memory as the engine reads it: with the version
// words of its pages (vasmon.Versioned).
type memory struct {
	*guestmem.Memory
	ver *guestmem.Versions
}

// Versions implements vasmon.Versioned.
func (m memory) Versions() *guestmem.Versions { return m.ver }

// hostMemory returns the VM's memory as the host reads it: versioned,
// unless a test asked for it without (Config.unversioned).
func (v *vm) hostMemory() vasmon.Memory {
	if v.s.cfg.unversioned {
		return v.mem
	}
	return memory{v.mem, v.ver}
}

// Guest-physical layout of a VM: page-table pages come from the table area
// [tableBase, tableEnd); data frames (never written: only their addresses
// appear in entries) from [tableEnd, RAM).
const (
	tableBase = 1 << 20
	numSlots  = 16 // regions (VMAs) per process, one per fixed slot of the address space
	entryP    = vasmon.BitP
	tableBits = vasmon.BitP | vasmon.BitRW | vasmon.BitUS | vasmon.BitA | vasmon.BitD // Linux's _PAGE_TABLE
	pdptSize  = 32
)

// vm is one simulated guest: its memory, protection, page allocator, kernel
// template and processes.
type vm struct {
	s     *Sim
	id    vasmon.VMID
	idx   int
	mode  vasmon.Mode
	esz   int
	mem   *guestmem.Memory
	ver   *guestmem.Versions // the version word of every page: protection, trapped stores
	prot  *protector
	truth *truth // tests: the ground truth (nil: not kept)
	quota uint64 // trapped events to produce; 0: unbounded

	amu      sync.Mutex // the allocator
	next     uint64     // bump pointer over the table area
	tableEnd uint64
	free     []uint64        // freed table pages, reused first (LIFO); bit 0: may hold entries
	occ      []atomic.Uint64 // per page of the table area: bit k set if its bytes [64k, 64k+64) may be non-zero
	pdpts    []uint64        // free PAE root slots (32 bytes each)
	tables   atomic.Int64

	kernel   []kentry // kernel-half root entries every new root copies
	zeroPage uint64   // the shared zero frame read faults map
	textRIP  uint64   // kernel text base: RIPs of the simulated stores

	mu      sync.Mutex // procs and nextPID
	procs   []*proc
	nextPID int
	trapped atomic.Uint64 // events submitted (budget)
}

type kentry struct {
	i int
	e uint64
}

func newVM(s *Sim, idx int, mode vasmon.Mode, ram uint64) *vm {
	ver := guestmem.NewVersions(ram)
	v := &vm{s: s, id: s.cfg.FirstVM + vasmon.VMID(idx), idx: idx, mode: mode, esz: mode.EntryBytes(),
		mem: guestmem.New(ram), ver: ver, prot: &protector{ver: ver}, next: tableBase, tableEnd: min(ram/4, 1<<30)}
	if s.cfg.truth {
		v.truth = newTruth(v)
		v.prot.truth = v.truth
	}
	v.occ = make([]atomic.Uint64, v.tableEnd/vasmon.PageSize)
	v.zeroPage = v.tableEnd
	v.textRIP = 0xffffffff81000000
	if v.esz == 4 || mode == vasmon.ModePAE {
		v.textRIP = 0xc1000000
	}
	return v
}

// allocPage takes a page from the table area, or returns 0 when it is
// exhausted; dirty says it may hold a freed table's stale entries.
func (v *vm) allocPage() (page uint64, dirty bool) {
	v.amu.Lock()
	defer v.amu.Unlock()
	if n := len(v.free); n > 0 {
		page = v.free[n-1]
		v.free = v.free[:n-1]
	} else if v.next+vasmon.PageSize <= v.tableEnd {
		page = v.next
		v.next += vasmon.PageSize
	} else {
		return 0, false
	}
	v.tables.Add(1)
	return page &^ 1, page&1 != 0
}

// allocPDPT takes a 32-byte PAE root slot (Linux allocates PAE PGDs from a
// slab: several roots share a page).
func (v *vm) allocPDPT() uint64 {
	v.amu.Lock()
	if n := len(v.pdpts); n > 0 {
		p := v.pdpts[n-1]
		v.pdpts = v.pdpts[:n-1]
		v.amu.Unlock()
		return p
	}
	v.amu.Unlock()
	page, _ := v.allocPage() // each slot is zeroed when allocated
	if page == 0 {
		return 0
	}
	v.amu.Lock()
	for off := uint64(vasmon.PageSize - pdptSize); off > 0; off -= pdptSize {
		v.pdpts = append(v.pdpts, page+off)
	}
	v.amu.Unlock()
	return page
}

func (v *vm) release(tables, roots []uint64) {
	if len(tables) == 0 && len(roots) == 0 {
		return
	}
	v.amu.Lock()
	v.free = append(v.free, tables...)
	v.pdpts = append(v.pdpts, roots...)
	v.amu.Unlock()
	v.tables.Add(-int64(len(tables)))
}

// slotBase returns the first VA of region slot k: slots never share a table
// below the level whose entries span the slot spacing, so unmapping a region
// frees its own tables. 4- and 5-level slots spread over several top-level
// entries (5-level ones above 128 TiB too); 32-bit and PAE ones over the low
// 2 GiB (the user half).
func (v *vm) slotBase(k int) uint64 {
	switch v.mode {
	case vasmon.Mode4:
		areas := [4]uint64{0x400000, 0x555500000000, 0x7f0000000000, 0x7ff000000000}
		return areas[k%4] + uint64(k/4)<<32
	case vasmon.Mode5:
		areas := [4]uint64{0x400000, 0x7f0000000000, 0x1000000000000, 0xff000000000000}
		return areas[k%4] + uint64(k/4)<<32
	}
	return 0x400000 + uint64(k)*0x7800000
}

// index returns the index of va's entry in a table at level.
func (v *vm) index(va uint64, level int) uint64 {
	return va >> v.mode.Shift(level) & uint64(v.mode.Entries(level)-1)
}

// entryAddr returns the address of va's entry in the table at t (level).
func (v *vm) entryAddr(t uint64, level int, va uint64) uint64 {
	return t + v.index(va, level)*uint64(v.esz)
}

// tableEntry returns the entry linking table t from a table at level.
func (v *vm) tableEntry(level int, t uint64) uint64 {
	if v.mode == vasmon.ModePAE && level == 3 {
		return t | entryP // PDPTEs have RW/US/A/D reserved
	}
	return t | tableBits
}

// prealloc reports whether the tables linked from the root are allocated
// with the root and never freed before it (PAE: the PDPTEs are loaded with
// CR3, so Linux preallocates every user PMD).
func (v *vm) prealloc(level int) bool {
	return v.mode == vasmon.ModePAE && level == v.mode.Levels()
}

// frameMask returns the frame bits of a leaf at level.
func (v *vm) frameMask(level int) uint64 {
	m := uint64(0x000FFFFFFFFFF000)
	if v.esz == 4 {
		m = 0xFFFFF000
	}
	return m &^ (v.mode.EntrySpan(level) - 1)
}

func (v *vm) leafEntry(frame uint64, level int, r *region, write bool) uint64 {
	e := frame | entryP | vasmon.BitUS | vasmon.BitA
	if level > 1 {
		e |= vasmon.BitPS
	}
	if write {
		e |= vasmon.BitRW | vasmon.BitD
	}
	if r.prot&protX == 0 && v.esz == 8 {
		e |= vasmon.BitNX
	}
	return e
}

// swapEntry returns a non-present entry holding a swap slot, where the
// guest's kernel keeps it: the high half on PAE, the frame bits elsewhere.
func (v *vm) swapEntry(slot uint64) uint64 {
	slot = slot&0x3FFFF + 1
	if v.mode == vasmon.ModePAE {
		return slot << 32
	}
	return slot<<12 | 2<<1 // type 2 in bits 1-5, P clear
}

// kernelVAs returns where the kernel template maps large pages (the direct
// map) and 4 KiB pages (kernel text).
func (v *vm) kernelVAs() (direct, text uint64) {
	switch v.mode {
	case vasmon.Mode4:
		return 0xffff888000000000, 0xffffffff81000000
	case vasmon.Mode5:
		return 0xff11000000000000, 0xffffffff81000000
	}
	return 0xc0000000, 0xc8000000
}

// rip returns the instruction pointer of a store site of an operation.
func (v *vm) rip(op Op, site int) uint64 { return v.textRIP + uint64(op)<<12 + uint64(site)<<4 }
