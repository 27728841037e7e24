package sim

import (
	"sync"
	"sync/atomic"

	"github.com/vasengine/vasengine/vasmon"
)

// The OS model: processes, their regions and the page-table writes a kernel
// makes for them. Every function here runs on the vCPU that holds the
// process's lock (or owns a process not yet visible to other vCPUs) and
// writes entries only through the vCPU's store primitives (vcpu.go).

// Region protections.
const (
	protR = 1 << iota
	protW
	protX
)

// region is a mapped range (a VMA) at a fixed slot of the address space.
type region struct {
	n     uint64 // size in pages of its leaf size; 0: the slot is free
	level int    // leaf level: 1 (4 KiB pages; THP may map level-2 leaves), 2 or 3 (hugetlb)
	prot  uint8
	thp   bool // anonymous, huge-page aligned: THP faults, collapses and splits
}

// proc is a process: an address space and the state a kernel keeps of it.
type proc struct {
	mu      sync.Mutex // held by the vCPU running the process
	pid     int
	root    uint64 // root table (PAE: the 32-byte PDPT); also the CR3
	regions [numSlots]region
	ref     atomic.Pointer[Root] // the monitored root, nil if none
	dead    bool
	ws      [64]uint64 // working set: the latest pages faulted in (aging and trimming pick from it)
	wsN     int
}

func (p *proc) addWS(va uint64) {
	p.ws[p.wsN%len(p.ws)] = va
	p.wsN++
}

// wsLeaf returns a present leaf of a random working-set page, if any.
func (c *vcpu) wsLeaf(p *proc) (a, e uint64, level int, ok bool) {
	if p.wsN == 0 {
		return 0, 0, 0, false
	}
	va := p.ws[c.rng.IntN(min(p.wsN, len(p.ws)))]
	a, e, level = c.walk(p.root, va, 1)
	return a, e, level, c.vm.mode.Classify(e, level) == vasmon.KindLeaf
}

func (v *vm) span(r *region) uint64 { return v.mode.EntrySpan(r.level) }

// initialRegions lays out a new program: text, data, a THP heap and a stack.
func (c *vcpu) initialRegions(p *proc) {
	rng := c.rng
	per2 := uint64(c.vm.mode.Entries(1))
	p.regions = [numSlots]region{
		0:            {n: 16 + rng.Uint64N(112), level: 1, prot: protR | protX},
		1:            {n: 8 + rng.Uint64N(56), level: 1, prot: protR | protW},
		2:            {n: 2 * per2, level: 1, prot: protR | protW, thp: true},
		numSlots - 1: {n: 16 + rng.Uint64N(48), level: 1, prot: protR | protW},
	}
}

// pickRegion returns a random mapped region accepted by ok (nil: any).
func (c *vcpu) pickRegion(p *proc, ok func(*region) bool) (uint64, *region) {
	k0 := c.rng.IntN(numSlots)
	for i := 0; i < numSlots; i++ {
		k := (k0 + i) % numSlots
		if r := &p.regions[k]; r.n > 0 && (ok == nil || ok(r)) {
			return c.vm.slotBase(k), r
		}
	}
	return 0, nil
}

// randomVA returns a random page of region r at base.
func (c *vcpu) randomVA(base uint64, r *region) uint64 {
	return base + c.rng.Uint64N(r.n)*c.vm.span(r)
}

// walk follows va from root down to level stop and returns the address,
// value and level of the entry it ends on: va's entry at level stop, or the
// first entry above it that links no table (not present, or a large page).
func (c *vcpu) walk(root, va uint64, stop int) (a, e uint64, level int) {
	m := c.vm.mode
	t := root
	for level = m.Levels(); ; level-- {
		a = c.vm.entryAddr(t, level, va)
		e = c.read(a)
		if level == stop || m.Classify(e, level) != vasmon.KindTable {
			return a, e, level
		}
		t = m.TableAddr(e)
	}
}

// link allocates the missing tables on va's path below the empty entry at a
// (level) and returns the address of va's entry at level stop, or 0 if the
// table area is exhausted. Each table is zeroed before it is linked.
func (c *vcpu) link(a uint64, level, stop int, va uint64) uint64 {
	for ; level > stop; level-- {
		t := c.allocTable()
		if t == 0 {
			return 0
		}
		c.setLink(a, c.vm.tableEntry(level, t))
		a = c.vm.entryAddr(t, level-1, va)
	}
	return a
}

// frame returns a data frame for a leaf at level: a random aligned frame of
// the data area (frames are not reference-counted; nothing reads them), or
// 0 if RAM holds no frame that large.
func (c *vcpu) frame(level int) uint64 {
	v := c.vm
	span := v.mode.EntrySpan(level)
	base := (v.tableEnd + span) &^ (span - 1) // above the zero page
	if base+span > v.mem.Size() {
		return 0
	}
	return base + c.rng.Uint64N((v.mem.Size()-base)/span)*span
}

// access is a user access to va in region r: the CPU sets A (and D on a
// write) in a present leaf without a trap; a non-present one faults.
func (c *vcpu) access(p *proc, r *region, va uint64, write bool) {
	v, m := c.vm, c.vm.mode
	if write && r.prot&protW == 0 {
		return // SIGSEGV: nothing is written
	}
	a, e, level := c.walk(p.root, va, r.level)
	if m.Classify(e, level) != vasmon.KindLeaf {
		if e != 0 && level == r.level { // swapped out
			if f := c.frame(level); f != 0 {
				c.ctr.swapIns.Add(1)
				c.set(a, v.leafEntry(f, level, r, write))
				p.addWS(va)
			}
			return
		}
		c.ctr.faults.Add(1)
		if r.thp && level == 2 && write && c.rng.IntN(4) == 0 { // a THP fault: one large page
			if f := c.frame(2); f != 0 {
				c.set(a, v.leafEntry(f, 2, r, true))
				p.addWS(va)
				return
			}
		}
		if a = c.link(a, level, r.level, va); a == 0 {
			return
		}
		f := v.zeroPage // read faults of anonymous memory map the zero page read-only
		if write || r.prot&protW == 0 || r.level > 1 {
			f = c.frame(r.level)
		}
		if f != 0 {
			c.set(a, v.leafEntry(f, r.level, r, write))
			p.addWS(va)
		}
		return
	}
	if write && e&vasmon.BitRW == 0 { // copy-on-write (or the zero page): copy to a new frame
		f := c.frame(level)
		if f == 0 {
			return
		}
		c.ctr.cow.Add(1)
		c.clear(a) // ptep_clear_flush, then set_pte_at
		c.set(a, v.leafEntry(f, level, r, true))
		p.addWS(va)
		return
	}
	n := e | vasmon.BitA
	if write {
		n |= vasmon.BitD
	}
	if n != e {
		c.hardwareAD(a, n)
	}
}

func (c *vcpu) touch(p *proc) {
	if base, r := c.pickRegion(p, nil); r != nil {
		c.access(p, r, c.randomVA(base, r), c.rng.IntN(100) < c.s.prof.WritePct)
	}
}

// age is the kernel's working-set aging: it clears the Accessed bit of a
// present leaf (or sets it, as Windows' software A bit does), one atomic
// store that changes nothing the monitor reports. It picks from the working
// set, else scans a random region.
func (c *vcpu) age(p *proc) {
	if a, e, _, ok := c.wsLeaf(p); ok {
		c.update(a, e^vasmon.BitA)
		return
	}
	base, r := c.pickRegion(p, nil)
	if r == nil {
		return
	}
	u := c.rng.Uint64N(r.n)
	for try := uint64(0); try < 8; try++ {
		a, e, level := c.walk(p.root, base+(u+try)%r.n*c.vm.span(r), r.level)
		if c.vm.mode.Classify(e, level) == vasmon.KindLeaf {
			c.update(a, e^vasmon.BitA)
			return
		}
	}
}

// mmap maps a new region in a free slot and touches a few of its pages.
func (c *vcpu) mmap(p *proc) {
	v, rng := c.vm, c.rng
	k0, k := rng.IntN(numSlots), -1
	for i := 0; i < numSlots && k < 0; i++ {
		if p.regions[(k0+i)%numSlots].n == 0 {
			k = (k0 + i) % numSlots
		}
	}
	if k < 0 {
		return
	}
	r := region{level: 1, prot: protR | protW}
	switch x := rng.IntN(20); {
	case x < 12: // anonymous buffer
		r.n = 1 + rng.Uint64N(256)
	case x < 16: // THP-eligible heap
		r.n, r.thp = (1+rng.Uint64N(4))*uint64(v.mode.Entries(1)), true
	case x < 19: // a shared library's text
		r.n, r.prot = 8+rng.Uint64N(120), protR|protX
	default: // hugetlbfs: 2/4 MiB pages, or one 1 GiB page where the mode and RAM allow
		r.n, r.level = 1+rng.Uint64N(4), 2
		if v.mode.LargeOK(3) && v.slotBase(k)%v.mode.EntrySpan(3) == 0 && c.frame(3) != 0 && rng.IntN(2) == 0 {
			r.n, r.level = 1, 3
		}
	}
	p.regions[k] = r
	base := v.slotBase(k)
	for i := 1 + rng.IntN(8); i > 0; i-- {
		c.access(p, &p.regions[k], c.randomVA(base, &r), r.prot&protW != 0)
	}
}

// rangeDo calls leaf for every non-empty entry that links no table and maps
// part of [lo, hi) under table t (at level, first VA base), and post for
// every table entry after its subtree was visited.
func (c *vcpu) rangeDo(t uint64, level int, base, lo, hi uint64, leaf, post func(a, e uint64, level int)) {
	m, esz := c.vm.mode, uint64(c.vm.esz)
	sh := m.Shift(level)
	for i := (lo - base) >> sh; i <= (hi-1-base)>>sh; i++ {
		a := t + i*esz
		e := c.read(a)
		if e == 0 {
			continue
		}
		va := base + i<<sh
		if m.Classify(e, level) == vasmon.KindTable {
			c.rangeDo(m.TableAddr(e), level-1, va, max(lo, va), min(hi, va+1<<sh), leaf, post)
			if post != nil {
				post(a, e, level)
			}
		} else {
			leaf(a, e, level)
		}
	}
}

// munmap unmaps a region: every entry cleared, then every table left empty
// unlinked and freed (Linux's zap_page_range and free_pgtables).
func (c *vcpu) munmap(p *proc) {
	base, r := c.pickRegion(p, nil)
	if r == nil {
		return
	}
	c.zap(p.root, base, base+r.n*c.vm.span(r))
	*r = region{}
}

func (c *vcpu) zap(root, lo, hi uint64) {
	v := c.vm
	c.rangeDo(root, v.mode.Levels(), 0, lo, hi,
		func(a, _ uint64, _ int) { c.clear(a) },
		func(a, e uint64, level int) {
			if t := v.mode.TableAddr(e); !v.prealloc(level) && c.empty(t) {
				c.clear(a)
				c.freeTable(t, false)
			}
		})
}

// empty reports whether the table page at t holds no entry.
func (c *vcpu) empty(t uint64) bool {
	empty := true
	c.each(t, vasmon.PageSize/c.vm.esz, func(int, uint64, uint64) bool {
		empty = false
		return false
	})
	return empty
}

// mprotect gives a region another protection and rewrites its present
// entries: RW cleared when it becomes read-only (set again by write
// faults), NX set or cleared.
func (c *vcpu) mprotect(p *proc) {
	base, r := c.pickRegion(p, nil)
	if r == nil {
		return
	}
	choices := [3]uint8{protR | protW, protR, protR | protX}
	k := 0
	for k < 2 && choices[k] != r.prot {
		k++
	}
	np := choices[(k+1+c.rng.IntN(2))%3] // another one
	r.prot = np
	c.rangeDo(p.root, c.vm.mode.Levels(), 0, base, base+r.n*c.vm.span(r), func(a, e uint64, level int) {
		if e&entryP == 0 {
			return
		}
		n := e
		if np&protW == 0 {
			n &^= vasmon.BitRW
		}
		if c.vm.esz == 8 { // NX exists only in 8-byte entries
			n |= vasmon.BitNX
			if np&protX != 0 {
				n &^= vasmon.BitNX
			}
		}
		if n != e {
			c.update(a, n)
		}
	}, nil)
}

// newRoot allocates a root table with the VM's kernel half copied in (and,
// on PAE, the user PMDs preallocated and linked). It returns 0 if the table
// area is exhausted.
func (c *vcpu) newRoot() uint64 {
	v := c.vm
	var root uint64
	if v.mode == vasmon.ModePAE {
		if root = v.allocPDPT(); root == 0 {
			c.ctr.oom.Add(1)
			return 0
		}
		c.zero(root, pdptSize)
	} else if root = c.allocTable(); root == 0 {
		return 0
	}
	if v.truth != nil {
		v.truth.newRoot(root)
	}
	for _, k := range v.kernel {
		c.store(root+uint64(k.i*v.esz), v.esz, k.e, siteCopy)
	}
	if v.mode == vasmon.ModePAE {
		for i := 0; i < v.mode.UserEntries(); i++ {
			t := c.allocTable()
			if t == 0 {
				c.freeRoot(root)
				return 0
			}
			c.setLink(root+uint64(i*8), v.tableEntry(3, t))
		}
	}
	return root
}

// freeTree tears down the user half of the tree at t (level): every entry
// cleared, every table freed, bottom up (exit_mmap). The root itself is
// freed too unless it is top (the caller frees roots).
func (c *vcpu) freeTree(t uint64, level int, top bool) {
	v := c.vm
	n := v.mode.Entries(level)
	if top {
		n = v.mode.UserEntries()
	}
	c.each(t, n, func(_ int, a, e uint64) bool {
		if v.mode.Classify(e, level) == vasmon.KindTable {
			c.freeTree(v.mode.TableAddr(e), level-1, false)
		}
		c.clear(a)
		return true
	})
	if !top {
		c.freeTable(t, false)
	}
}

func (c *vcpu) freeRoot(root uint64) {
	c.freeTree(root, c.vm.mode.Levels(), true)
	if t := c.vm.truth; t != nil {
		t.freeRoot(root)
	}
	if c.vm.mode == vasmon.ModePAE {
		c.freeR = append(c.freeR, root)
	} else {
		c.freeTable(root, true) // the kernel half is left in place
	}
}

// copyTree copies the user half of the tree at src into the new tree at dst
// for fork: every writable leaf is write-protected in the parent (a trapped
// store) and copied write-protected and old into the child, so that both
// fault on the next write (copy-on-write). It returns false if the table
// area is exhausted.
func (c *vcpu) copyTree(src, dst uint64, level int, top bool) bool {
	v := c.vm
	n := v.mode.Entries(level)
	if top {
		n = v.mode.UserEntries()
	}
	ok := true
	c.each(src, n, func(i int, a, e uint64) bool {
		b := dst + uint64(i*v.esz)
		switch v.mode.Classify(e, level) {
		case vasmon.KindTable:
			t := v.mode.TableAddr(c.read(b)) // preallocated PAE PMD
			if !v.prealloc(level) {
				if t = c.allocTable(); t == 0 {
					ok = false
					return false
				}
				c.setLink(b, v.tableEntry(level, t))
			}
			ok = c.copyTree(v.mode.TableAddr(e), t, level-1, false)
		case vasmon.KindLeaf:
			if e&vasmon.BitRW != 0 {
				e &^= vasmon.BitRW
				c.update(a, e) // ptep_set_wrprotect
			}
			c.set(b, e&^vasmon.BitA)
		default: // swap entry
			c.set(b, e)
		}
		return ok
	})
	return ok
}

// fork creates a child process with a copy-on-write copy of p's address
// space and starts monitoring it once the copy is made (when a real agent
// learns of the new process).
func (c *vcpu) fork(p *proc) {
	v := c.vm
	v.mu.Lock()
	full := len(v.procs) >= c.s.maxProcs
	v.mu.Unlock()
	if full {
		return
	}
	root := c.newRoot()
	if root == 0 {
		return
	}
	if !c.copyTree(p.root, root, v.mode.Levels(), true) {
		c.freeRoot(root)
		return
	}
	child := &proc{root: root, regions: p.regions}
	c.spawn(child)
}

// spawn gives a new process its pid, starts monitoring it and lets the
// vCPUs run it.
func (c *vcpu) spawn(p *proc) {
	v := c.vm
	v.mu.Lock()
	v.nextPID++
	p.pid = v.nextPID
	v.mu.Unlock()
	c.start(p)
	v.mu.Lock()
	v.procs = append(v.procs, p)
	v.mu.Unlock()
}

// exec replaces p's address space by a new program's: the new root is
// monitored before the old one is stopped and torn down.
func (c *vcpu) exec(p *proc) {
	root := c.newRoot()
	if root == 0 {
		return
	}
	old, oldRef := p.root, p.ref.Swap(nil)
	p.root, p.wsN = root, 0
	c.initialRegions(p)
	c.start(p)
	c.stopRoot(oldRef)
	c.freeRoot(old)
	for i := 0; i < 4; i++ { // the new program starts running
		c.touch(p)
	}
}

// create makes a new process running a new program (CreateProcess,
// posix_spawn): a new root, monitored from the start, then its first
// faults.
func (c *vcpu) create() {
	v := c.vm
	v.mu.Lock()
	full := len(v.procs) >= c.s.maxProcs
	v.mu.Unlock()
	if full {
		return
	}
	p := &proc{root: c.newRoot()}
	if p.root == 0 {
		return
	}
	c.initialRegions(p)
	p.mu.Lock() // visible to the other vCPUs once spawned
	defer p.mu.Unlock()
	cur := c.cur
	c.cur = p // its stores are synchronous by its own root (Config.SyncRoot)
	defer func() { c.cur = cur }()
	c.spawn(p)
	for i := 0; i < 4; i++ {
		c.touch(p)
	}
	c.flush()
}

// exit ends p (never pid 1, the VM's init): monitoring stops first, then the
// tree is torn down and its pages freed.
func (c *vcpu) exit(p *proc) {
	if p.pid == 1 {
		return
	}
	c.stopRoot(p.ref.Swap(nil))
	v := c.vm
	v.mu.Lock()
	for i, q := range v.procs {
		if q == p {
			v.procs = append(v.procs[:i], v.procs[i+1:]...)
			break
		}
	}
	v.mu.Unlock()
	c.freeRoot(p.root)
	p.dead = true
}

// thpChunk returns the level-2 entry of a random huge-page-sized chunk of a
// random THP region of p.
func (c *vcpu) thpChunk(p *proc) (a, e uint64, r *region, ok bool) {
	base, r := c.pickRegion(p, func(r *region) bool { return r.thp })
	if r == nil {
		return 0, 0, nil, false
	}
	chunks := r.n / uint64(c.vm.mode.Entries(1))
	a, e, level := c.walk(p.root, base+c.rng.Uint64N(chunks)*c.vm.mode.EntrySpan(2), 2)
	return a, e, r, level == 2
}

// collapse is khugepaged: a PTE table of a THP region with present entries
// and no swapped-out one is replaced by a large page (a copy in a new huge
// frame) in one store of its level-2 entry; the table is freed, its stale
// entries left in place.
func (c *vcpu) collapse(p *proc) {
	v := c.vm
	a, e, r, ok := c.thpChunk(p)
	if !ok || v.mode.Classify(e, 2) != vasmon.KindTable {
		return
	}
	t, present, swapped := v.mode.TableAddr(e), 0, false
	c.each(t, v.mode.Entries(1), func(_ int, _, pte uint64) bool {
		present++
		swapped = pte&entryP == 0
		return !swapped
	})
	f := c.frame(2)
	if present == 0 || swapped || f == 0 {
		return
	}
	if c.update(a, v.leafEntry(f, 2, r, r.prot&protW != 0)) {
		c.freeTable(t, true)
	} // else denied: the table stays linked
}

// split replaces a large page of a THP region by a new PTE table mapping the
// same frames with the same flags, filled before it is linked.
func (c *vcpu) split(p *proc) {
	v := c.vm
	a, e, _, ok := c.thpChunk(p)
	if !ok || v.mode.Classify(e, 2) != vasmon.KindLeaf {
		return
	}
	t := c.allocTable()
	if t == 0 {
		return
	}
	frame, flags := e&v.frameMask(2), e&^(v.frameMask(2)|vasmon.BitPS)
	for i := 0; i < v.mode.Entries(1); i++ {
		c.set(t+uint64(i*v.esz), frame+uint64(i)*vasmon.PageSize|flags)
	}
	if !c.update(a, v.tableEntry(2, t)) { // denied: the large page stays
		c.freeTable(t, true)
	}
}

// swapOut evicts a present 4 KiB page, from the working set or else of an
// anonymous region: the entry is cleared, then set to a swap entry
// (ptep_get_and_clear, set_pte_at).
func (c *vcpu) swapOut(p *proc) {
	if a, _, level, ok := c.wsLeaf(p); ok && level == 1 {
		c.clear(a)
		c.set(a, c.vm.swapEntry(c.rng.Uint64()))
		return
	}
	base, r := c.pickRegion(p, func(r *region) bool { return r.level == 1 && r.prot&protX == 0 })
	if r == nil {
		return
	}
	for try := 0; try < 4; try++ {
		a, e, level := c.walk(p.root, c.randomVA(base, r), 1)
		if level == 1 && e&entryP != 0 {
			c.clear(a)
			c.set(a, c.vm.swapEntry(c.rng.Uint64()))
			return
		}
	}
}

// buildKernel builds the VM's kernel half in a template root (a few large
// pages of direct map and 4 KiB pages of kernel text, in shared kernel
// tables) and records its root entries for newRoot to copy.
func (c *vcpu) buildKernel() bool {
	v := c.vm
	tmpl := c.allocTable()
	if tmpl == 0 {
		return false
	}
	direct, text := v.kernelVAs()
	kr := &region{n: 1, prot: protR | protW | protX}
	mapAt := func(va uint64, level int, f uint64) bool {
		a, _, l := c.walk(tmpl, va, level)
		if a = c.link(a, l, level, va); a == 0 {
			return false
		}
		c.set(a, v.leafEntry(f, level, kr, true)&^vasmon.BitUS|vasmon.BitG)
		return true
	}
	for i := uint64(0); i < 8; i++ {
		if !mapAt(direct+i*v.mode.EntrySpan(2), 2, i*v.mode.EntrySpan(2)) {
			return false
		}
	}
	for i := uint64(0); i < 16; i++ {
		if !mapAt(text+i*vasmon.PageSize, 1, 0x100000+i*vasmon.PageSize) {
			return false
		}
	}
	for i := v.mode.UserEntries(); i < v.mode.Entries(v.mode.Levels()); i++ {
		if e := c.read(tmpl + uint64(i*v.esz)); e != 0 {
			v.kernel = append(v.kernel, kentry{i, e})
		}
	}
	return true
}

// reusePct is the percentage of freed table pages that are reused as data
// at once.
const reusePct = 75

// reuse is the page allocator handing out, at once, the table pages the
// operation freed, as Linux's does with its per-CPU lists of hot pages:
// most become data (a user page, a slab object, a kernel stack, the
// kernel's own mmu_gather batch) and take a few stores of it; every one is
// reused as a table later, before untouched pages (release keeps the free
// list LIFO), zeroed first if it holds anything. A store to a page whose
// unhook has not landed yet traps: that is how an engine behind the guest
// meets a freed table's page holding data (SEMANTICS.md section 6, "No
// phantoms").
func (c *vcpu) reuse() {
	op := c.op
	c.op = OpReuse
	for k, t := range c.freeT {
		if c.rng.IntN(100) >= reusePct {
			continue
		}
		c.ctr.ops[OpReuse].Add(1)
		c.freeT[k] = t | 1 // zeroed when it becomes a table again
		c.fillData(t &^ 1)
	}
	c.op = op
}

// fillData makes a few stores of data into the page at pg, each of a kind
// the kernel or a process writes, in the guest's native word (4 bytes for
// 32-bit and PAE kernels, 8 for 4- and 5-level ones): random bytes, a
// counter next to a constant (an mmu_gather batch's nr and max), a kernel
// stack's end magic, pointers (to the kernel's direct map, to a user
// stack), ASCII text, and 1- and 2-byte fields.
func (c *vcpu) fillData(pg uint64) {
	rng := c.rng
	w := 8
	if c.vm.mode == vasmon.Mode32 || c.vm.mode == vasmon.ModePAE {
		w = 4
	}
	mask := uint64(1)<<(8*w) - 1
	for n := 1 + rng.IntN(8); n > 0; n-- {
		a := pg + rng.Uint64N(vasmon.PageSize/uint64(w))*uint64(w)
		switch rng.IntN(6) {
		case 0: // user data
			c.store(a, w, rng.Uint64()&mask, siteDataRandom)
		case 1: // a counter next to a constant: mmu_gather_batch {next; nr; max = 510}
			hi := uint64(510) << 32
			if w == 4 {
				hi = 0
				c.store(a^4, 4, 510, siteDataCounter)
			}
			for k := uint64(0); k <= rng.Uint64N(4); k++ {
				c.store(a, w, hi|k, siteDataCounter)
			}
		case 2: // a kernel stack's end magic (STACK_END_MAGIC)
			c.store(a, w, 0x57ac6e9d, siteDataCounter)
		case 3: // a pointer
			p := 0xffff888000000000 | rng.Uint64N(1<<30)&^7
			switch {
			case w == 4 && rng.IntN(2) == 0:
				p = 0xc0000000 | rng.Uint64N(1<<29)&^3
			case w == 4:
				p = 0xbf800000 | rng.Uint64N(1<<23)
			case rng.IntN(2) == 0:
				p = 0x7ffc00000000 | rng.Uint64N(1<<32)
			}
			c.store(a, w, p, siteDataPointer)
		case 4: // text
			var t uint64
			for i := 0; i < w; i++ {
				t |= (0x20 + rng.Uint64N(95)) << (8 * i)
			}
			c.store(a, w, t, siteDataText)
		default: // a flag byte or a 16-bit field
			size := 1 + rng.IntN(2)
			c.store(a+uint64(rng.IntN(w/size)*size), size, rng.Uint64N(1<<(8*size)), siteDataNarrow)
		}
	}
}
