package vasmon

import (
	"encoding/binary"
	"sync/atomic"
	"unsafe"

	"github.com/vasengine/vasengine/guestmem"
)

// Op is the kind of a structural request.
type Op uint8

// Structural requests produced by the per-table step.
const (
	OpHook   Op = iota + 1 // hook the table at GPA as Level of Root at VA
	OpUnhook               // unhook that table and, through further requests, its subtree
	// OpDropped tells the parent of the table at GPA (the table of
	// generation PGen one level up) that the table was not hooked, or was
	// unhooked early, because guest memory did not link it there when it
	// was read: the parent forgets that link and reads its page again.
	OpDropped
)

// Request is a structural follow-up of a per-table step. It is a fixed-size
// value holding one pointer (the root). The single-threaded Monitor
// executes requests at once, in FIFO order; the sharded engine routes each
// to the shard that owns its page (Page).
type Request struct {
	Root  *Root
	GPA   uint64    // table address (page-aligned, or 32-byte aligned for a PAE root)
	VA    uint64    // first VA the table maps (canonical)
	Anc   [4]uint32 // page numbers+1 of the ancestor tables, nearest first
	PGen  uint32    // generation of the parent table that linked it (0 for a root)
	Level uint8
	Op    Op
	// Report (hooks only) reports the table's present leaves as new
	// mappings: true for tables linked by a write, false under Start.
	Report bool
}

// Page returns the guest page whose store executes the request: the
// table's own, or for OpDropped its parent's.
func (q *Request) Page() uint64 {
	if q.Op == OpDropped {
		return uint64(q.Anc[0]-1) * PageSize
	}
	return q.GPA &^ (PageSize - 1)
}

// Call is one callback to invoke: callback(ctx, VA, Old, New, Size).
type Call struct {
	Root               *Root
	VA, Old, New, Size uint64
}

// Output collects what steps produce. Its slices are reused: Reset keeps
// their capacity, so a warmed-up Output allocates nothing; Trim gives back
// what a spike grew.
type Output struct {
	Calls []Call
	Reqs  []Request
}

// Reset empties the output.
func (o *Output) Reset() {
	o.Calls = o.Calls[:0]
	o.Reqs = o.Reqs[:0]
}

// Output sizes kept across Trim.
const (
	keepCalls = 4096
	keepReqs  = 4096
)

// Trim empties the output and releases slices that grew past their usual
// size (an alias bomb unhooked at once), so a spike does not hold host
// memory for ever.
func (o *Output) Trim() {
	o.Reset()
	if cap(o.Calls) > 4*keepCalls {
		o.Calls = make([]Call, 0, keepCalls)
	}
	if cap(o.Reqs) > 4*keepReqs {
		o.Reqs = make([]Request, 0, keepReqs)
	}
}

// WriteKind classifies a processed write event.
type WriteKind uint8

// Write kinds, in increasing order of significance; a write that spans
// several entries gets the most significant kind of its parts.
const (
	WriteUntracked  WriteKind = iota // no hooked table on the written page, or already in its read (stale)
	WriteIrrelevant                  // only bits neither structural nor monitored changed
	WritePartial                     // an entry is not yet completely written
	WriteDuplicate                   // a chunk re-delivered from the same RIP; ignored
	WriteRelevant                    // a callback or a structural request resulted, or the page was read again
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

// Hook results. Unsure is the only one that is not final: the request
// keeps its place in the budgets and its executor runs it again later.
const (
	Hooked    HookResult = iota + 1
	Refused              // the root or VM table budget is exhausted
	Failed               // the page could not be read or protected
	Ignored              // the root is stopped
	Duplicate            // the same link is already hooked
	Collision            // another table is hooked at the same place; not hooked
	Stale                // guest memory no longer links the table there: not hooked, parent told (OpDropped)
	Unsure               // guest memory kept changing under the read: run the request again later
)

// page is a hooked guest page: the shadow copy of its bytes, shared by every
// table node on it. The shadow holds what every node on the page has acted
// on: values that could not be proven are never written into it.
type page struct {
	pfn    uint64
	mon    uint64         // union of relevant bits of the nodes' roots
	vw     *atomic.Uint64 // the page's version word; nil without versions
	vm     VMID
	head   uint32 // first node on the page
	refs   uint32 // nodes on the page
	writes uint32
	rseq   uint32 // change count at the page's last read: writes stamped up to it are in the shadow
	seq    uint32 // change count the shadow stands for: rseq plus two per write applied since
	last   uint32 // stamp of the last write applied since the read (0: none)
	npend  uint16 // in-progress partial writes on this page
	esz    uint8  // entry size of the tables on the page
	dirty  bool   // on the dirty list: to be read again
	reads  uint32 // times the page was read again (resync)
	// Write floods (see flood.go).
	// ft is the Write.Trap that opened the current counting window, or
	// of the last read while the page is polled.
	ft     int64
	fcount uint32 // writes in the window
	polled bool   // flooded: no longer protected, read again now and then
	quiet  uint8  // polls in a row that found the page unchanged
}

// node is one occurrence of a table in a root's tree.
type node struct {
	root *Root
	va   uint64
	// cv are the change counts of the ancestor pages when the table was
	// last proven linked (versioned memory; see chain): their words were
	// stable and protected with these counts.
	cv  [4]uint32
	anc [4]uint32
	// pc is the change count of the table's own page loaded, during that
	// proof, after the ancestors' words: a write stamped after it was
	// made while the table was linked, if cv still holds.
	pc    uint32
	page  uint32
	next  uint32 // next node on the same page
	prev  uint32 // previous node on the same page (O(1) unlink of one of many aliases)
	gen   uint32
	pgen  uint32
	links uint32 // handle of the node's link set (tables above level 1; 0 at level 1)
	off   uint16 // byte offset of the table in its page (PAE root)
	level uint8
	// proven says cv holds the proof of the table's place.
	proven bool
	_      [1]byte
	// relink is set when the hook of a link of the node was dropped
	// (OpDropped): entry relink-1 (relinkAll: every entry) is hooked
	// again by the next read of the page, if guest memory links a table
	// there (a hook of a table already hooked is a harmless duplicate).
	relink uint16
}

// linkSet has bit i set while entry i of a node links a table whose hook
// was admitted (emitted) and not dropped: only those entries get unhook
// requests, so unhooking costs requests in proportion to the tables
// hooked, not to the links a guest claims (an alias bomb beyond the
// budget); and an entry that links a table with its bit clear is hooked by
// the next step or read of the entry.
type linkSet struct {
	bits [maxTableEntries / 64]uint64
}

// maxTableEntries is the most entries of a table in any mode (32-bit).
const maxTableEntries = 1024

// DefaultPendingTimeout is how long (in Write.Trap nanoseconds) a partial
// write may stay pending before a later event completes it with the bytes
// it has.
const DefaultPendingTimeout = 1_000_000

// Store holds table nodes and page shadows and applies the per-table step.
// One Store is owned by one goroutine at a time: the Monitor, or whoever
// holds the engine shard whose pages it holds. It is not safe for
// concurrent use. After warm-up (arenas and indexes grown to their working
// size) Write, Hook, Unhook and the reads of guest memory allocate nothing.
type Store struct {
	pages   arena[page]
	shadows arena[[PageSize]byte] // indexed by page handle; its free list is unused
	nodes   arena[node]
	links   arena[linkSet] // link sets of the nodes above level 1
	byPage  hindex         // (vm, pfn) -> page
	byPlace hindex         // (root, level, va) -> node
	pend    []pend
	pendOld int64  // smallest known first-chunk Trap among pend; 0: none
	pendSeq uint64 // partial writes started
	dups    [dupSlots]dupChunk
	dirty   []uint32 // pages to read again
	st      StoreStats
	// scratch
	buf   [8]byte
	tmp   [PageSize]byte
	nodeQ []uint32

	// PendingTimeout ends a partial write whose first chunk was trapped
	// more than this long (Write.Trap nanoseconds) before a later event
	// of the store; 0: DefaultPendingTimeout.
	PendingTimeout int64
	// Flood is the write-flood policy (see flood.go); the zero value is
	// the default.
	Flood  FloodPolicy
	polled []uint32 // pages flooded, polled
}

// StoreStats counts a store's events by outcome.
type StoreStats struct {
	Writes         [numWriteKinds]uint64
	Hooks          uint64
	Unhooks        uint64
	UnhookMisses   uint64 // unhooks of a table that is not hooked (refused, dropped, unhooked early)
	HookDuplicates uint64 // hooks of a link already hooked
	Collisions     uint64 // hooks that found another table at their place
	StaleWrites    uint64 // writes already in the read of their page (Write.Ver), dropped
	// StaleReads counts tables that guest memory did not link at their
	// place when they were read: hooks dropped and tables unhooked early.
	StaleReads uint64
	// Unconfirmed counts completed entry values that were no longer in
	// guest memory, or whose table was no longer linked, when processed:
	// the page was read again instead.
	Unconfirmed uint64
	// Proofs counts completed entry values proven on guest memory;
	// StampProofs those proven by their store's stamp (Write.Stamped)
	// without reading guest memory.
	Proofs, StampProofs uint64
	Resyncs             uint64 // pages read again and compared with their shadow
	Unsure              uint64 // reads given up for now because guest memory kept changing under them
	ProtectErrors       uint64
	ForcedPartial       uint64 // partial writes completed early because maxPending was reached
	ExpiredPartial      uint64 // partial writes completed after PendingTimeout
	FlushedPartial      uint64 // partial writes completed by Flush, an unhook or a read of their page
	Floods              uint64 // pages found flooded (polled instead of trapped)
	Polls               uint64 // reads of flooded pages
	Pages               int
	Tables              int
	Dirty               int // pages waiting to be read again
	Polled              int // pages flooded now
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
	st.Dirty = len(s.dirty)
	st.Polled = len(s.polled)
	return st
}

// Tables returns the number of tables hooked in the store.
func (s *Store) Tables() int { return s.nodes.live }

// HostBytes returns the host memory held by the store's arenas and indexes.
func (s *Store) HostBytes() uintptr {
	return s.pages.bytes(unsafe.Sizeof(page{})) + s.shadows.bytes(PageSize) +
		s.nodes.bytes(unsafe.Sizeof(node{})) + s.links.bytes(unsafe.Sizeof(linkSet{})) + s.byPage.bytes() + s.byPlace.bytes() +
		uintptr(cap(s.pend))*unsafe.Sizeof(pend{}) + uintptr(cap(s.dirty))*4 + uintptr(cap(s.nodeQ))*4 +
		unsafe.Sizeof(Store{})
}

func pageHash(vm VMID, pfn uint64) uint64 { return hashKey(uint64(vm), pfn) }

func placeHash(r *Root, level uint8, va uint64) uint64 {
	return hashKey(uint64(r.ID)<<8|uint64(level), va)
}

// PageHash returns the hash of guest page gpa of vm, by which the store
// indexes its pages and the engine routes them.
func PageHash(vm VMID, gpa uint64) uint64 { return pageHash(vm, gpa/PageSize) }

func (s *Store) findPage(vm VMID, pfn uint64) uint32 {
	return s.byPage.find(pageHash(vm, pfn), func(h uint32) bool {
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
	return getEntry(s.shadows.at(ph)[off:], esz)
}

func getEntry(b []byte, esz uint8) uint64 {
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

// index returns the entry of node n that holds byte offset eoff of its
// page, or -1.
func index(n *node, eoff uint64, esz uint8) int {
	if eoff < uint64(n.off) {
		return -1
	}
	i := int(eoff-uint64(n.off)) / int(esz)
	if i >= n.root.Mode.Entries(int(n.level)) {
		return -1
	}
	return i
}

func (s *Store) call(out *Output, r *Root, va, old, new, size uint64) {
	if va == 0 && r.Opts.IgnoreNullPage {
		return
	}
	out.Calls = append(out.Calls, Call{Root: r, VA: va, Old: old, New: new, Size: size})
}

// Write processes one trapped write of VM vm: for every entry it touches, on
// every table hooked on the written page (or pages: a write that crosses a
// page boundary is split per page), it runs the per-table step once the
// entry is completely written (SEMANTICS.md section 3).
func (s *Store) Write(vm VMID, w *Write, out *Output) WriteKind {
	kind := WriteUntracked
	if w.Size == 0 || w.Size > 8 {
		return kind
	}
	if w.Trap != 0 && len(s.pend) > 0 {
		s.expire(w.Trap, out)
	}
	if w.Trap != 0 && len(s.polled) > 0 {
		s.poll(w.Trap, false, out)
	}
	gpa, end := w.GPA, w.GPA+uint64(w.Size)
	data := w.Data
	ver := w.Ver
	first := true
	for gpa < end {
		pageEnd := (gpa | (PageSize - 1)) + 1
		partEnd := min(end, pageEnd)
		ph := s.findPage(vm, gpa/PageSize)
		inSeq := false
		if ph != 0 {
			p := s.pages.at(ph)
			switch {
			case p.vw == nil:
			case ver == 0 || !guestmem.After(ver, p.rseq):
				// Made before the page's last read: already in the
				// shadow. (With versions, a part without a stamp did not
				// trap on this page: it was not protected yet, so the
				// write predates the read that followed the protection.)
				s.st.StaleWrites++
				ph = 0
			case ver == p.last:
				// The same trap delivered again.
				kind = max(kind, WriteDuplicate)
				ph = 0
			default:
				inSeq = p.npend == 0 && ver-1 == p.seq &&
					(p.last == 0 && p.seq == p.rseq || p.seq == p.last+1)
				p.seq += 2
				p.last = ver
			}
		}
		if ph == 0 {
			data >>= 8 * (partEnd - gpa)
			gpa = partEnd
			first = false
			ver = w.Ver2
			continue
		}
		p := s.pages.at(ph)
		p.writes++
		if w.Trap != 0 && !p.polled {
			s.countFlood(ph, vm, w.Trap)
		}
		esz := uint64(p.esz)
		reads := p.reads
		var stamp uint32
		if w.Stamped && p.vw != nil {
			stamp = ver
		}
		for gpa < partEnd {
			off := gpa % PageSize
			eoff := off &^ (esz - 1)
			lo := off - eoff
			n := min(esz-lo, partEnd-gpa)
			k := s.writeEntry(vm, ph, eoff, lo, n, data, w, first, stamp, inSeq, out)
			inSeq = false // (the shadow now holds this entry's new bytes; memory may not yet)
			kind = max(kind, k)
			data >>= 8 * n
			gpa += n
			first = false
			if p := s.pages.at(ph); p.refs == 0 || p.reads != reads {
				// Every table on the page was unhooked by this write
				// (found no longer linked), or the page was read again:
				// the rest of the write is untracked, or in the read.
				data >>= 8 * (partEnd - gpa)
				gpa = partEnd
			}
		}
		ver = w.Ver2
	}
	s.st.Writes[kind]++
	return kind
}

// complete runs the per-table step for a completely written entry on every
// table of the page that holds it, once the new value is proven true: in
// guest memory now, on a page that every table's ancestors link now; or,
// when stamp is not 0 (the store that wrote new, stamped before it reached
// memory; see writeEntry), right after that store, with every table linked
// then (linkedAt). A value that cannot be proven is not applied; the page
// is read again instead (resync), which reports the difference between
// what the tables acted on and what guest memory holds.
func (s *Store) complete(ph uint32, eoff, old, new uint64, stamp uint32, out *Output) WriteKind {
	p := s.pages.at(ph)
	if (old^new)&p.mon == 0 {
		s.setEntry(ph, eoff, p.esz, new)
		return WriteIrrelevant
	}
	if stamp != 0 && s.linkedAt(ph, stamp) {
		s.st.StampProofs++
	} else if s.prove(ph, eoff, new, out) {
		s.st.Proofs++
	} else {
		s.st.Unconfirmed++
		s.resync(ph, out)
		return WriteRelevant
	}
	p = s.pages.at(ph)
	if p.refs == 0 {
		return WriteRelevant
	}
	s.setEntry(ph, eoff, p.esz, new)
	kind := WriteIrrelevant
	for h := p.head; h != 0; h = s.nodes.at(h).next {
		if i := index(s.nodes.at(h), eoff, p.esz); i >= 0 && s.step(h, i, old, new, out) {
			kind = WriteRelevant
		}
	}
	return kind
}

// prove proves on guest memory that the entry at eoff of page ph holds new
// (in the bits the page's tables monitor) while every table of the page is
// linked at its place, at one instant. Tables found not linked are
// unhooked early (dropNode).
func (s *Store) prove(ph uint32, eoff, new uint64, out *Output) bool {
	p := s.pages.at(ph)
	var w uint64 // the page's version word, under which the value is proven
	if p.vw != nil {
		w = p.vw.Load()
	}
	if !p.isCurrent(w) {
		// Later writes of the page are still to come: read the entry.
		vm := s.nodes.at(p.head).root.VM
		e, ok := s.read(vm.Mem, p.pfn*PageSize+eoff, p.esz)
		if !ok || (e^new)&p.mon != 0 {
			return false
		}
	}
	return s.proveNodes(ph, p.vw, w, out)
}

// isCurrent reports whether the shadow of p is guest memory at the time
// p's version word was w: every trapped write of the page has been
// applied, none was in progress, and no partial write holds bytes that
// memory has and the shadow has not.
func (p *page) isCurrent(w uint64) bool {
	if p.vw == nil || p.npend != 0 || !guestmem.Stable(w) || w&guestmem.VerProtected == 0 {
		return false
	}
	c := guestmem.Count(w)
	// Counted writes all applied, and the last one applied is the last
	// one made (a trap delivered twice would otherwise fool the count).
	return c == p.seq && (p.last == 0 && c == p.rseq || c == p.last+1)
}

// read reads the entry of esz bytes at gpa from mem.
func (s *Store) read(mem Memory, gpa uint64, esz uint8) (uint64, bool) {
	if mem.Read(gpa, s.buf[:esz]) != nil {
		return 0, false
	}
	return getEntry(s.buf[:], esz), true
}

// step is the per-table step: entry i of table node h changed from old to
// new. It produces the callbacks for the table's own leaves and appends the
// structural requests: an unhook when the entry stops linking the table it
// linked, a hook whenever it links a table not hooked (so a link whose hook
// was dropped or refused is tried again). It reports whether anything
// resulted.
func (s *Store) step(h uint32, i int, old, new uint64, out *Output) bool {
	n := s.nodes.at(h)
	r := n.root
	if i >= scope(n) {
		if old != new {
			r.stats.outOfScope.Add(1)
		}
		return false
	}
	m := r.Mode
	level := int(n.level)
	ok, nk := m.Classify(old, level), m.Classify(new, level)
	relevant := false
	if ok == KindTable && (nk != KindTable || m.TableAddr(old) != m.TableAddr(new)) && s.emitUnhook(n, i, old, out) {
		relevant = true
	}
	if nk == KindTable && !s.linked(n, i) && !r.Stopped() {
		// (A stopped root hooks nothing more; its tables still report
		// their changes until they are unhooked, so that the removals
		// Stop reports start from what was reported.)
		s.emitHook(n, i, new, true, out)
		relevant = true
	}
	if nk == KindReserved && ok != KindReserved {
		r.stats.reserved.Add(1)
	}
	if s.leafChange(n, i, old, new, ok, nk, m.EntrySpan(level), out) {
		relevant = true
	}
	return relevant
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

// relinkAll in node.relink: every entry of the node is to be hooked again.
const relinkAll = 0xFFFF
