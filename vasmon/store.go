package vasmon

import (
	"encoding/binary"
	"unsafe"
)

// Op is the kind of a structural request.
type Op uint8

// Structural requests produced by the per-table step.
const (
	OpHook   Op = iota + 1 // hook the table at GPA as Level of Root at VA
	OpUnhook               // unhook that table and, through further requests, its subtree
)

// Request is a structural follow-up of a per-table step: hook or unhook one
// table. It is a fixed-size value holding one pointer (the root). The
// single-threaded Monitor executes requests at once, in FIFO order; the
// sharded engine routes each to the shard that owns the page of GPA.
type Request struct {
	Root  *Root
	GPA   uint64    // table address (page-aligned, or 32-byte aligned for a PAE root)
	VA    uint64    // first VA the table maps (canonical)
	Anc   [4]uint32 // page numbers+1 of the ancestor tables, nearest first (self-map detection)
	PGen  uint32    // generation of the parent table that linked it (0 for a root)
	Level uint8
	Op    Op
	// Report (hooks only) reports the table's present leaves as new
	// mappings: true for tables linked by a write, false under Start.
	Report bool
}

// Call is one callback to invoke: callback(ctx, VA, Old, New, Size).
type Call struct {
	Root               *Root
	VA, Old, New, Size uint64
}

// Output collects what one step produces. Its slices are reused: Reset keeps
// their capacity, so a warmed-up Output allocates nothing.
type Output struct {
	Calls []Call
	Reqs  []Request
}

// Reset empties the output.
func (o *Output) Reset() {
	o.Calls = o.Calls[:0]
	o.Reqs = o.Reqs[:0]
}

// WriteKind classifies a processed write event.
type WriteKind uint8

// Write kinds, in increasing order of significance; a write that spans
// several entries gets the most significant kind of its parts.
const (
	WriteUntracked  WriteKind = iota // no hooked table on the written page
	WriteIrrelevant                  // only bits neither structural nor monitored changed
	WritePartial                     // an entry is not yet completely written
	WriteDuplicate                   // a chunk re-delivered from the same RIP; ignored
	WriteRelevant                    // a callback or a structural request resulted
	numWriteKinds
)

var writeKindNames = [...]string{"untracked", "irrelevant", "partial", "duplicate", "relevant"}

func (k WriteKind) String() string {
	if int(k) < len(writeKindNames) {
		return writeKindNames[k]
	}
	return "invalid"
}

// WriteKinds lists every kind, for counters and metrics.
var WriteKinds = []WriteKind{WriteUntracked, WriteIrrelevant, WritePartial, WriteDuplicate, WriteRelevant}

// HookResult says what a hook request did.
type HookResult uint8

// Hook results.
const (
	Hooked     HookResult = iota + 1
	Superseded            // hooked; an older table at the same place became stale
	Refused               // the root or VM table budget is exhausted
	Failed                // the page could not be read or protected
	Ignored               // the root is stopped
	Duplicate             // the same link is already hooked
)

// page is a hooked guest page: the shadow copy of its bytes, shared by every
// table node on it.
type page struct {
	pfn    uint64
	readAt int64 // Store.Clock when the page was read; 0 without a clock
	vm     VMID
	head   uint32 // first node on the page
	refs   uint32 // nodes on the page
	writes uint32
	mon    uint64 // union of relevant bits of the nodes' roots
	npend  uint16 // in-progress partial writes on this page
	esz    uint8  // entry size of the tables on the page
	nstale uint32 // stale nodes on the page
}

// node is one occurrence of a table in a root's tree.
type node struct {
	root  *Root
	va    uint64
	anc   [4]uint32
	page  uint32
	next  uint32 // next node on the same page
	prev  uint32 // previous node on the same page (O(1) unlink of one of many aliases)
	gen   uint32
	pgen  uint32
	off   uint16 // byte offset of the table in its page (PAE root)
	level uint8
	stale bool // superseded by a newer table at the same place
	// links is the handle of the node's link set (tables above level 1;
	// 0 at level 1, whose entries never link tables).
	links uint32
}

// linkSet has bit i set while entry i of a node links a table whose hook
// was admitted (emitted): only those entries get unhook requests, so
// unhooking costs requests in proportion to the tables hooked, not to the
// links a guest claims (an alias bomb beyond the budget).
type linkSet [maxTableEntries / 64]uint64

// maxTableEntries is the most entries of a table in any mode (32-bit).
const maxTableEntries = 1024

// pend is the state of an entry write in progress (partial write).
type pend struct {
	base, val, rip uint64
	trap           int64 // Write.Trap of the first chunk
	page           uint32
	off            uint16
	mask           uint8
}

// oldTrustMask: a backend's Write.Old is used instead of the shadow value
// only when the two agree in these bits (P, PS, table address). They differ
// only when the shadow is ahead of the event - the page was read at hook
// time after the write was made - and the tables hooked follow the shadow.
const oldTrustMask = BitP | BitPS | 0x000FFFFFFFFFF000

// maxPending bounds the partial writes in progress per store; past it the
// oldest one is completed with the bytes it has (counted), so a guest that
// never completes its writes costs bounded memory.
const maxPending = 1024

// Store holds table nodes and page shadows and applies the per-table step.
// One Store is owned by one goroutine: the Monitor, or one engine shard
// whose pages it holds. It is not safe for concurrent use. After warm-up
// (arenas and indexes grown to their working size) Hook, Unhook and Write
// allocate nothing.
type Store struct {
	pages   arena[page]
	shadows arena[[PageSize]byte] // indexed by page handle; its free list is unused
	nodes   arena[node]
	links   arena[linkSet] // link sets of the nodes above level 1
	byPage  hindex         // (vm, pfn) -> page
	byPlace hindex         // (root, level, va) -> current node
	nstale  int            // stale nodes
	pend    []pend
	st      StoreStats
	// Clock, if set, stamps when a hooked page is read (see Write.Seen).
	Clock func() int64
}

// StoreStats counts a store's events by outcome.
type StoreStats struct {
	Writes         [numWriteKinds]uint64
	Hooks          uint64
	Unhooks        uint64
	UnhookMisses   uint64 // unhook of a table that was never hooked (refused, out of RAM...)
	Supersedes     uint64
	Duplicates     uint64 // hooks of a link already hooked
	Stale          uint64 // writes seen before their page was read by a hook (Write.Seen)
	ProtectErrors  uint64
	ForcedPartial  uint64 // partial writes completed early because maxPending was reached
	ExpiredPartial uint64 // partial writes completed by ExpirePending
	Pages          int
	Tables         int
}

// NewStore returns an empty store.
func NewStore() *Store {
	return &Store{pages: newArena[page](8), shadows: newArena[[PageSize]byte](4), nodes: newArena[node](8),
		links: newArena[linkSet](4)}
}

// Stats returns the store's counters.
func (s *Store) Stats() StoreStats {
	st := s.st
	st.Pages = s.pages.live
	st.Tables = s.nodes.live
	return st
}

// HostBytes returns the host memory held by the store's arenas and indexes.
func (s *Store) HostBytes() uintptr {
	return s.pages.bytes(unsafe.Sizeof(page{})) + s.shadows.bytes(PageSize) +
		s.nodes.bytes(unsafe.Sizeof(node{})) + s.links.bytes(unsafe.Sizeof(linkSet{})) + s.byPage.bytes() + s.byPlace.bytes() +
		uintptr(cap(s.pend))*unsafe.Sizeof(pend{})
}

func pageHash(vm VMID, pfn uint64) uint64 { return hashKey(uint64(vm), pfn) }

func placeHash(r *Root, level uint8, va uint64) uint64 {
	return hashKey(uint64(r.ID)<<8|uint64(level), va)
}

// PageHash returns the hash the store indexes guest page gpa of vm by. An
// executor that already computed it (the engine routes pages by its high
// bits) passes it in Write.Hash to spare the store computing it again.
func PageHash(vm VMID, gpa uint64) uint64 { return pageHash(vm, gpa/PageSize) }

func (s *Store) findPage(vm VMID, pfn uint64) uint32 {
	return s.findPageHash(vm, pfn, pageHash(vm, pfn))
}

func (s *Store) findPageHash(vm VMID, pfn, hash uint64) uint32 {
	return s.byPage.find(hash, func(h uint32) bool {
		p := s.pages.at(h)
		return p.pfn == pfn && p.vm == vm
	})
}

func (s *Store) findPlace(r *Root, level uint8, va uint64) uint32 {
	return s.byPlace.find(placeHash(r, level, va), func(h uint32) bool {
		n := s.nodes.at(h)
		return n.root == r && n.level == level && n.va == va
	})
}

func (s *Store) entry(ph uint32, off uint64, esz uint8) uint64 {
	b := s.shadows.at(ph)[off:]
	if esz == 4 {
		return uint64(binary.LittleEndian.Uint32(b))
	}
	return binary.LittleEndian.Uint64(b)
}

func (s *Store) setEntry(ph uint32, off uint64, esz uint8, v uint64) {
	b := s.shadows.at(ph)[off:]
	if esz == 4 {
		binary.LittleEndian.PutUint32(b, uint32(v))
		return
	}
	binary.LittleEndian.PutUint64(b, v)
}

// scope returns the number of entries of node n that are monitored.
func scope(n *node) int {
	m := n.root.Mode
	if int(n.level) == m.Levels() && !n.root.Opts.FullSpace {
		return m.UserEntries()
	}
	return m.Entries(int(n.level))
}

func (s *Store) call(out *Output, r *Root, va, old, new, size uint64) {
	if va == 0 && r.Opts.IgnoreNullPage {
		return
	}
	out.Calls = append(out.Calls, Call{Root: r, VA: va, Old: old, New: new, Size: size})
}

// emitHook appends a hook request for the table that entry i (value e) of
// node n links, unless it is outside RAM or a self-reference.
func (s *Store) emitHook(n *node, i int, e uint64, report bool, out *Output) {
	r := n.root
	m := r.Mode
	child := m.TableAddr(e)
	level := int(n.level) - 1
	cpfn := child / PageSize
	if cpfn >= 1<<32-1 || !r.VM.Mem.InRAM(child, uint64(m.TableBytes(level))) {
		r.stats.outOfRAM.Add(1)
		return
	}
	self := uint32(s.pages.at(n.page).pfn) + 1
	c := uint32(cpfn) + 1
	if c == self || c == n.anc[0] || c == n.anc[1] || c == n.anc[2] || c == n.anc[3] {
		r.stats.selfRef.Add(1)
		return
	}
	req := Request{
		Root: r, GPA: child, VA: m.EntryVA(n.va, int(n.level), i), Level: uint8(level),
		Anc: [4]uint32{self, n.anc[0], n.anc[1], n.anc[2]}, PGen: n.gen, Op: OpHook, Report: report,
	}
	// Admission: the tables hooked plus the hooks emitted and not yet run
	// may not pass a budget, so the requests in flight stay in proportion
	// to the budgets, not to what the guest claims (an alias bomb makes
	// every hooked table link 512 more).
	vm := r.VM
	if r.tables.Load()+r.admitted.Load() >= r.Opts.MaxTables || vm.tables.Load()+vm.admitted.Load() >= vm.MaxTables {
		r.refuseN(1, &req)
		return
	}
	r.admitted.Add(1)
	vm.admitted.Add(1)
	if n.links != 0 {
		s.links.at(n.links)[i/64] |= 1 << (i % 64)
	}
	out.Reqs = append(out.Reqs, req)
}

// Dropped tells the store that an executor drops hook request req, emitted
// by a step, without running it (its parent changed meanwhile), so that it
// no longer counts against the budgets.
func Dropped(req *Request) {
	if req.Op == OpHook && int(req.Level) < req.Root.Mode.Levels() {
		req.Root.admitted.Add(-1)
		req.Root.VM.admitted.Add(-1)
	}
}

// emitUnhook appends an unhook request for the table that entry i (value e)
// of node n linked, if its hook was admitted.
func (s *Store) emitUnhook(n *node, i int, e uint64, out *Output) {
	if n.links != 0 {
		ls, bit := s.links.at(n.links), uint64(1)<<(i%64)
		if ls[i/64]&bit == 0 {
			return
		}
		ls[i/64] &^= bit
	}
	r := n.root
	out.Reqs = append(out.Reqs, Request{
		Root: r, GPA: r.Mode.TableAddr(e), VA: r.Mode.EntryVA(n.va, int(n.level), i),
		Level: n.level - 1, PGen: n.gen, Op: OpUnhook,
	})
}

// Exec executes one request (Hook or Unhook).
func (s *Store) Exec(req *Request, out *Output) {
	if req.Op == OpHook {
		s.Hook(req, out)
	} else {
		s.Unhook(req, out)
	}
}

// Hook is the hook step: it hooks the table of req (protecting its page if it
// is the page's first table), reports its present leaves if req.Report, and
// appends a hook request for every table it links. If a table is already
// hooked at the same place (root, level, VA) - possible only when the engine
// delivers a newer link before the older unlink - the new table supersedes
// it: the difference between the two is reported, and the old one becomes
// stale (it reports nothing more and is removed silently by its unhook).
func (s *Store) Hook(req *Request, out *Output) HookResult {
	r := req.Root
	Dropped(req) // from here on it counts as a table or as nothing
	if r.Stopped() {
		return Ignored
	}
	prev := s.findPlace(r, req.Level, req.VA)
	if prev != 0 {
		pn := s.nodes.at(prev)
		if pn.pgen == req.PGen && s.pages.at(pn.page).pfn == req.GPA/PageSize && uint64(pn.off) == req.GPA%PageSize {
			// The same link delivered twice (an executor released a
			// delayed hook after the link was made again): already done.
			s.st.Duplicates++
			return Duplicate
		}
	}
	vm := r.VM
	if r.tables.Add(1) > r.Opts.MaxTables {
		r.tables.Add(-1)
		r.refuse(req)
		return Refused
	}
	if vm.tables.Add(1) > vm.MaxTables {
		r.tables.Add(-1)
		vm.tables.Add(-1)
		r.refuse(req)
		return Refused
	}
	m := r.Mode
	esz := uint8(m.EntryBytes())
	pfn := req.GPA / PageSize
	ph := s.findPage(vm.ID, pfn)
	if ph == 0 {
		ph = s.newPage(vm, pfn, esz)
		if ph == 0 {
			r.tables.Add(-1)
			vm.tables.Add(-1)
			r.stats.outOfRAM.Add(1)
			return Failed
		}
	} else if s.pages.at(ph).esz != esz {
		// A page cannot hold tables of different entry sizes in a sane
		// guest; refuse rather than mix write states.
		r.tables.Add(-1)
		vm.tables.Add(-1)
		r.stats.reserved.Add(1)
		return Failed
	}
	p := s.pages.at(ph)
	p.mon |= r.Monitored | m.structuralMask()
	p.refs++

	res := Hooked
	if prev != 0 {
		s.byPlace.remove(placeHash(r, req.Level, req.VA), prev)
		pn := s.nodes.at(prev)
		pn.stale = true
		s.pages.at(pn.page).nstale++
		s.nstale++
		s.st.Supersedes++
		res = Superseded
	}
	nh := s.nodes.alloc()
	n := s.nodes.at(nh)
	*n = node{root: r, va: req.VA, anc: req.Anc, page: ph, next: p.head, gen: r.gen.Add(1),
		pgen: req.PGen, off: uint16(req.GPA % PageSize), level: req.Level}
	if req.Level > 1 {
		n.links = s.links.alloc() // released zeroed
	}
	if p.head != 0 {
		s.nodes.at(p.head).prev = nh
	}
	p.head = nh
	s.byPlace.insert(placeHash(r, req.Level, req.VA), nh)
	s.st.Hooks++

	level := int(req.Level)
	size := m.EntrySpan(level)
	var pn *node
	var poff uint64
	if prev != 0 {
		pn = s.nodes.at(prev)
		poff = uint64(pn.off)
	}
	for i, lim := 0, scope(n); i < lim; i++ {
		e := s.entry(ph, uint64(n.off)+uint64(i)*uint64(esz), esz)
		k := m.Classify(e, level)
		switch k {
		case KindTable:
			s.emitHook(n, i, e, req.Report || prev != 0, out)
		case KindReserved:
			r.stats.reserved.Add(1)
		}
		if pn != nil {
			old := s.entry(pn.page, poff+uint64(i)*uint64(esz), esz)
			s.leafChange(n, i, old, e, m.Classify(old, level), k, size, out)
		} else if k == KindLeaf && req.Report && !r.Opts.HVMICompat {
			s.call(out, r, m.EntryVA(n.va, level, i), 0, e, size)
		}
	}
	return res
}

// newPage starts tracking a guest page: protect it, then copy it, so that no
// write falls between the copy and the protection unseen.
func (s *Store) newPage(vm *VM, pfn uint64, esz uint8) uint32 {
	gpa := pfn * PageSize
	if err := vm.Prot.Protect(gpa); err != nil {
		s.st.ProtectErrors++
		return 0
	}
	var readAt int64
	if s.Clock != nil {
		readAt = s.Clock()
	}
	ph := s.pages.alloc()
	s.shadows.ensure(ph)
	if err := vm.Mem.Read(gpa, s.shadows.at(ph)[:]); err != nil {
		s.pages.release(ph)
		if vm.Prot.Unprotect(gpa) != nil {
			s.st.ProtectErrors++
		}
		return 0
	}
	*s.pages.at(ph) = page{pfn: pfn, vm: vm.ID, esz: esz, readAt: readAt}
	s.byPage.insert(pageHash(vm.ID, pfn), ph)
	return ph
}

// leafChange reports a change of entry i of n from old to new when either
// is a leaf and they differ in presence-as-leaf or in a monitored bit.
func (s *Store) leafChange(n *node, i int, old, new uint64, ok, nk Kind, size uint64, out *Output) bool {
	if ok != KindLeaf && nk != KindLeaf {
		return false
	}
	r := n.root
	if ok == nk && (old^new)&r.Monitored == 0 {
		return false
	}
	s.call(out, r, r.Mode.EntryVA(n.va, int(n.level), i), old, new, size)
	return true
}

// refuse counts a hook of req refused by the root's or the VM's budget.
func (r *Root) refuse(req *Request) { r.refuseN(1, req) }

// refuseN counts n refused hooks of r, the last of which is req.
func (r *Root) refuseN(n int64, req *Request) {
	r.stats.refused.Add(n)
	r.VM.refused.Add(n)
	r.stats.lastRefusedGPA.Store(req.GPA)
	r.stats.lastRefusedVA.Store(req.VA)
	r.stats.lastRefusedLevel.Store(int32(req.Level))
}

// Unhook is the unhook step: it removes the table of req (the one linked by
// the parent of generation req.PGen), reports its present leaves as removed
// (unless it is stale) and appends an unhook request for every table it
// links. The page is unprotected when its last table goes.
func (s *Store) Unhook(req *Request, out *Output) {
	nh := s.unhookTarget(req)
	if nh == 0 {
		s.st.UnhookMisses++
		return
	}
	s.unhookNode(nh, out)
}

// unhookTarget returns the node that unhook request req removes, or 0 if
// that table is not hooked here.
func (s *Store) unhookTarget(req *Request) uint32 {
	r := req.Root
	pfn := req.GPA / PageSize
	nh := s.findPlace(r, req.Level, req.VA)
	if nh != 0 {
		n := s.nodes.at(nh)
		if n.pgen != req.PGen || s.pages.at(n.page).pfn != pfn {
			nh = 0
		}
	}
	if nh == 0 && s.nstale > 0 {
		// A stale table superseded by a newer link at the same place.
		// (Only pages holding stale nodes are searched: a page can hold
		// a budget's worth of aliases.)
		if ph := s.findPage(r.VM.ID, pfn); ph != 0 && s.pages.at(ph).nstale > 0 {
			for h := s.pages.at(ph).head; h != 0; h = s.nodes.at(h).next {
				n := s.nodes.at(h)
				if n.stale && n.root == r && n.level == req.Level && n.va == req.VA && n.pgen == req.PGen {
					nh = h
					break
				}
			}
		}
	}
	return nh
}

func (s *Store) unhookNode(nh uint32, out *Output) {
	n := s.nodes.at(nh)
	r := n.root
	m := r.Mode
	level := int(n.level)
	esz := uint64(m.EntryBytes())
	size := m.EntrySpan(level)
	report := !n.stale
	for i, lim := 0, scope(n); i < lim; i++ {
		e := s.entry(n.page, uint64(n.off)+uint64(i)*esz, uint8(esz))
		switch m.Classify(e, level) {
		case KindTable:
			s.emitUnhook(n, i, e, out)
		case KindLeaf:
			if report {
				s.call(out, r, m.EntryVA(n.va, level, i), e, 0, size)
			}
		}
	}
	if !n.stale {
		s.byPlace.remove(placeHash(r, n.level, n.va), nh)
	}
	ph := n.page
	p := s.pages.at(ph)
	if n.stale {
		p.nstale--
		s.nstale--
	}
	// Unlink from the page's chain.
	if n.prev == 0 {
		p.head = n.next
	} else {
		s.nodes.at(n.prev).next = n.next
	}
	if n.next != 0 {
		s.nodes.at(n.next).prev = n.prev
	}
	r.tables.Add(-1)
	r.VM.tables.Add(-1)
	vm := r.VM
	if n.links != 0 {
		s.links.release(n.links)
	}
	s.nodes.release(nh)
	s.st.Unhooks++
	p.refs--
	if p.refs == 0 {
		s.dropPage(vm, ph)
	}
}

func (s *Store) dropPage(vm *VM, ph uint32) {
	p := s.pages.at(ph)
	if p.npend > 0 {
		for i := 0; i < len(s.pend); i++ {
			if s.pend[i].page == ph {
				s.pend[i] = s.pend[len(s.pend)-1]
				s.pend = s.pend[:len(s.pend)-1]
				i--
			}
		}
	}
	if vm.Prot.Unprotect(p.pfn*PageSize) != nil {
		s.st.ProtectErrors++
	}
	s.byPage.remove(pageHash(p.vm, p.pfn), ph)
	s.pages.release(ph)
}

// Write processes one trapped write of VM vm: for every entry it touches, on
// every table hooked on the written page, it runs the per-table step once
// the entry is completely written.
func (s *Store) Write(vm VMID, w *Write, out *Output) WriteKind {
	kind := WriteUntracked
	if w.Size == 0 || w.Size > 8 {
		return kind
	}
	gpa, end := w.GPA, w.GPA+uint64(w.Size)
	data := w.Data
	first := true
	for gpa < end {
		pageEnd := (gpa | (PageSize - 1)) + 1
		var ph uint32
		if first && w.Hash != 0 {
			ph = s.findPageHash(vm, gpa/PageSize, w.Hash)
		} else {
			ph = s.findPage(vm, gpa/PageSize)
		}
		if ph == 0 {
			n := min(end, pageEnd) - gpa
			data >>= 8 * n
			gpa += n
			first = false
			continue
		}
		p := s.pages.at(ph)
		if w.Seen != 0 && w.Seen < p.readAt {
			// Applied to memory before the hook read the page: already
			// in the shadow.
			s.st.Stale++
			n := min(end, pageEnd) - gpa
			data >>= 8 * n
			gpa += n
			first = false
			continue
		}
		p.writes++
		esz := uint64(p.esz)
		for gpa < end && gpa < pageEnd {
			off := gpa % PageSize
			eoff := off &^ (esz - 1)
			lo := off - eoff
			n := min(esz-lo, end-gpa)
			k := s.writeEntry(ph, eoff, lo, n, data, w, first, out)
			kind = max(kind, k)
			data >>= 8 * n
			gpa += n
			first = false
		}
	}
	s.st.Writes[kind]++
	return kind
}

// writeEntry applies bytes [lo, lo+n) of the entry at eoff of page ph.
func (s *Store) writeEntry(ph uint32, eoff, lo, n, data uint64, w *Write, first bool, out *Output) WriteKind {
	p := s.pages.at(ph)
	esz := uint64(p.esz)
	cur := s.entry(ph, eoff, p.esz)
	full := uint8(1)<<esz - 1
	chunk := (uint8(1)<<n - 1) << lo
	bytesMask := uint64(1)<<(8*n) - 1
	if n == 8 {
		bytesMask = ^uint64(0)
	}
	bytesMask <<= 8 * lo
	val := data << (8 * lo) & bytesMask

	pi := -1
	if p.npend > 0 {
		for i := range s.pend {
			if s.pend[i].page == ph && uint64(s.pend[i].off) == eoff {
				pi = i
				break
			}
		}
	}
	var old, new uint64
	if pi < 0 && chunk == full {
		old = cur
		if first && w.HasOld && (w.Old^cur)&oldTrustMask == 0 {
			old = w.Old
			if esz == 4 {
				old &= 0xFFFFFFFF
			}
		}
		new = val
	} else {
		if pi < 0 {
			base := cur
			if first && w.HasOld && (w.Old^cur)&oldTrustMask == 0 {
				base = w.Old
				if esz == 4 {
					base &= 0xFFFFFFFF
				}
			}
			pi = s.addPend(ph, eoff, base, out)
			s.pend[pi].trap = w.Trap
			p = s.pages.at(ph)
		}
		pr := &s.pend[pi]
		if pr.mask&chunk == chunk && w.RIP != 0 && w.RIP == pr.rip {
			return WriteDuplicate
		}
		pr.val = pr.val&^bytesMask | val
		pr.mask |= chunk
		pr.rip = w.RIP
		if pr.mask != full {
			return WritePartial
		}
		old, new = pr.base, pr.val
		s.pend[pi] = s.pend[len(s.pend)-1]
		s.pend = s.pend[:len(s.pend)-1]
		p.npend--
	}
	return s.complete(ph, eoff, old, new, out)
}

func (s *Store) addPend(ph uint32, eoff, base uint64, out *Output) int {
	if s.pend == nil {
		s.pend = make([]pend, 0, maxPending)
	}
	if len(s.pend) == maxPending {
		// Complete the oldest in-progress write with the bytes it has.
		pr := s.pend[0]
		copy(s.pend, s.pend[1:])
		s.pend = s.pend[:len(s.pend)-1]
		s.pages.at(pr.page).npend--
		s.st.ForcedPartial++
		s.complete(pr.page, uint64(pr.off), pr.base, pr.val, out)
	}
	s.pend = append(s.pend, pend{base: base, val: base, page: ph, off: uint16(eoff)})
	s.pages.at(ph).npend++
	return len(s.pend) - 1
}

// complete runs the per-table step for a completely written entry on every
// table of the page that holds it.
func (s *Store) complete(ph uint32, eoff, old, new uint64, out *Output) WriteKind {
	p := s.pages.at(ph)
	s.setEntry(ph, eoff, p.esz, new)
	if (old^new)&p.mon == 0 {
		return WriteIrrelevant
	}
	kind := WriteIrrelevant
	for h := p.head; h != 0; h = s.nodes.at(h).next {
		n := s.nodes.at(h)
		if eoff < uint64(n.off) {
			continue
		}
		i := int(eoff-uint64(n.off)) / int(p.esz)
		if i >= n.root.Mode.Entries(int(n.level)) {
			continue
		}
		if s.Step(h, i, old, new, out) {
			kind = WriteRelevant
		}
	}
	return kind
}

// Step is the per-table step: entry i of table node h changed from old to
// new. It produces the callbacks for the table's own leaves and appends the
// structural requests for linked and unlinked tables. It reports whether
// anything resulted.
func (s *Store) Step(h uint32, i int, old, new uint64, out *Output) bool {
	n := s.nodes.at(h)
	r := n.root
	if r.Stopped() {
		return false
	}
	if i >= scope(n) {
		r.stats.outOfScope.Add(1)
		return false
	}
	m := r.Mode
	level := int(n.level)
	ok, nk := m.Classify(old, level), m.Classify(new, level)
	relevant := false
	if ok == KindTable && (nk != KindTable || m.TableAddr(old) != m.TableAddr(new)) {
		s.emitUnhook(n, i, old, out)
		relevant = true
	}
	if nk == KindTable && (ok != KindTable || m.TableAddr(old) != m.TableAddr(new)) && !n.stale {
		s.emitHook(n, i, new, true, out)
		relevant = true
	}
	if nk == KindReserved && ok != KindReserved {
		r.stats.reserved.Add(1)
	}
	if !n.stale && s.leafChange(n, i, old, new, ok, nk, m.EntrySpan(level), out) {
		relevant = true
	}
	return relevant
}
