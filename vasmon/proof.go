package vasmon

import (
	"sync/atomic"

	"github.com/vasengine/vasengine/guestmem"
)

// Proofs against guest memory (SEMANTICS.md section 6, "No phantoms").
//
// An executor that runs behind the guest (the sharded engine) processes a
// write, or reads a newly linked table, after the guest may have changed
// what it depends on: unlinked the table, freed its page and reused it as
// data. Whatever the monitor reports or hooks must have been true at some
// instant. Two facts are proven, on guest memory, before anything is
// reported or hooked:
//
//   - the table's place: guest memory links the table's page at its level
//     and VA from the root, through the ancestor pages of the monitor's
//     own tree (chain);
//   - the value: the entry (or the page, for a read) in guest memory is the
//     value reported.
//
// With versioned memory (Versioned) both are proven at one instant by
// sequence locks: a page's version word unchanged across a read proves the
// read saw one state of the page, while it stayed write-protected. A chain
// once proven is remembered as the ancestors' version words, so proving it
// again costs a load per ancestor until one of them is written. A value
// that cannot be proven is not applied: the page is read again (resync) and
// the difference between what its tables acted on and the read is
// reported, as for a newly linked table. A table whose place guest memory
// no longer links is unhooked early (its mappings reported removed), and
// its parent is told (OpDropped): the write that unlinked it is still to
// come, and a link restored meanwhile is hooked again from a fresh read.
//
// Without versions the proofs read guest memory without sequence locks:
// exact when the monitor runs synchronously with the guest (the Monitor
// called after each write), a best effort otherwise.

// proof is the outcome of a proof.
type proof uint8

const (
	proofOK     proof = iota // true at one instant
	proofStale               // false: guest memory does not link the table there
	proofUnsure              // guest memory kept changing: try again later
)

// proofTries is how many times a proof is attempted while guest memory
// changes under it before it is given up for now.
const proofTries = 3

// chain proves that guest memory links node n's table at its place. With
// versions, when also is not nil, also must still hold the word alsoWant
// after the walk: the caller read its page under that word, and the chain
// and the read must hold at one instant.
func (s *Store) chain(n *node, also *atomic.Uint64, alsoWant uint64) proof {
	r := n.root
	m := r.Mode
	top := m.Levels()
	up := top - int(n.level) // ancestors
	if up == 0 {
		return proofOK
	}
	vs := r.VM.vers
	if vs != nil && n.proven && s.stillLinked(n, vs, up) {
		return proofOK
	}
	for try := 0; try < proofTries; try++ {
		var cv [4]uint32
		var pc uint32
		if vs != nil {
			ok := true
			for k := 0; k < up; k++ {
				w := vs.Load(uint64(n.anc[k]-1) * PageSize)
				cv[k] = guestmem.Count(w)
				if !guestmem.Stable(w) {
					ok = false
				} else if w&guestmem.VerProtected == 0 {
					// An ancestor's page is no longer protected: its
					// table was unhooked, and this one will be.
					return proofStale
				}
			}
			if !ok {
				continue
			}
			// After the ancestors' words: see node.pc.
			pc = guestmem.Count(vs.Load(s.pages.at(n.page).pfn * PageSize))
		}
		res := s.walkTo(n)
		if vs != nil {
			same := true
			for k := 0; k < up && same; k++ {
				same = vs.Load(uint64(n.anc[k]-1)*PageSize) == protectedWord(cv[k])
			}
			if same && also != nil {
				same = also.Load() == alsoWant
			}
			if !same {
				continue
			}
		}
		if res == proofOK {
			n.cv, n.pc, n.proven = cv, pc, vs != nil
		}
		return res
	}
	s.st.Unsure++
	return proofUnsure
}

// protectedWord is the version word of a protected page with change count
// c and no write in progress.
func protectedWord(c uint32) uint64 { return uint64(c)<<32 | guestmem.VerProtected }

// stillLinked reports whether node n's last proof of its place (cv, with
// up ancestors) still holds: no ancestor page changed since. It loads one
// word per ancestor.
func (s *Store) stillLinked(n *node, vs *guestmem.Versions, up int) bool {
	for k := 0; k < up; k++ {
		if vs.Load(uint64(n.anc[k]-1)*PageSize) != protectedWord(n.cv[k]) {
			return false
		}
	}
	return true
}

// linkedAt reports whether every table on page ph was linked at its place
// when a store stamped stamp (before it reached memory: Write.Stamped) was
// made to the page: each table's last proof still holds (so its place
// stayed linked from that proof's start until now), and the stamp is
// after the page's count loaded during that proof (so the store was made
// after the proof started). A value that such a store wrote into the
// entry is then true at the instant right after it, with every table
// linked: proven without reading guest memory. It loads one word per
// ancestor per table.
func (s *Store) linkedAt(ph uint32, stamp uint32) bool {
	p := s.pages.at(ph)
	for h := p.head; h != 0; {
		n := s.nodes.at(h)
		h = n.next
		up := n.root.Mode.Levels() - int(n.level)
		if up == 0 {
			continue // a root table is linked by its root
		}
		vs := n.root.VM.vers
		if vs == nil || !n.proven || !guestmem.After(stamp, n.pc) || !s.stillLinked(n, vs, up) {
			return false
		}
	}
	return true
}

// walkTo walks guest memory from n's root table down n's VA and reports
// whether it reaches n's table at n's level through n's ancestor pages.
func (s *Store) walkTo(n *node) proof {
	r := n.root
	m := r.Mode
	esz := uint8(m.EntryBytes())
	lvl := int(n.level)
	table := r.RootGPA()
	self := uint64(s.pages.at(n.page).pfn)*PageSize + uint64(n.off)
	for l := m.Levels(); l > lvl; l-- {
		if table/PageSize != uint64(n.anc[l-lvl-1]-1) {
			return proofStale
		}
		i := (n.va >> m.Shift(l)) & uint64(m.Entries(l)-1)
		e, ok := s.read(r.VM.Mem, table+i*uint64(esz), esz)
		if !ok || m.Classify(e, l) != KindTable {
			return proofStale
		}
		table = m.TableAddr(e)
	}
	if table != self {
		return proofStale
	}
	return proofOK
}

// proveNodes proves the place of every table on page ph (see chain; also
// as there). Tables found not linked are unhooked early (dropNode). It
// returns false if some proof is unsure.
func (s *Store) proveNodes(ph uint32, also *atomic.Uint64, alsoWant uint64, out *Output) bool {
	p := s.pages.at(ph)
	stale := s.nodeQ[:0]
	for h := p.head; h != 0; h = s.nodes.at(h).next {
		var w *atomic.Uint64
		if alsoWant != 0 {
			w = also
		}
		switch s.chain(s.nodes.at(h), w, alsoWant) {
		case proofStale:
			stale = append(stale, h)
		case proofUnsure:
			s.nodeQ = stale[:0]
			return false
		}
	}
	for _, h := range stale {
		s.dropNode(h, out)
	}
	s.nodeQ = stale[:0]
	return true
}

// dropNode unhooks the table of node h, found not linked at its place in
// guest memory, and tells its parent (OpDropped).
func (s *Store) dropNode(h uint32, out *Output) {
	n := s.nodes.at(h)
	s.st.StaleReads++
	if int(n.level) < n.root.Mode.Levels() {
		p := s.pages.at(n.page)
		out.Reqs = append(out.Reqs, Request{Root: n.root, GPA: p.pfn*PageSize + uint64(n.off), VA: n.va, Anc: n.anc,
			PGen: n.pgen, Level: n.level, Op: OpDropped})
	}
	s.unhookNode(h, out)
}

// markDirty puts page ph on the list of pages to read again.
func (s *Store) markDirty(ph uint32) {
	p := s.pages.at(ph)
	if !p.dirty {
		p.dirty = true
		s.dirty = append(s.dirty, ph)
	}
}

// readPage reads page ph from guest memory into s.tmp under its version
// word, which it returns (0 without versions).
func (s *Store) readPage(p *page, mem Memory) (uint64, proof) {
	for try := 0; try < proofTries; try++ {
		var w uint64
		if p.vw != nil {
			w = p.vw.Load()
			if !guestmem.Stable(w) {
				continue
			}
			if w&guestmem.VerProtected == 0 && !p.polled {
				return 0, proofStale
			}
		}
		if mem.Read(p.pfn*PageSize, s.tmp[:]) != nil {
			return 0, proofStale
		}
		if p.vw != nil && p.vw.Load() != w {
			continue
		}
		return w, proofOK
	}
	s.st.Unsure++
	return 0, proofUnsure
}

// resync reads page ph again and makes its tables act on the difference
// between their shadow and guest memory, as one write of every changed
// entry: a page whose value could not be proven, or whose link was
// dropped. Tables found not linked are unhooked early. Partial writes of
// the page end: their bytes are in the read. If guest memory keeps
// changing, the page stays on the dirty list (Retry, Flush). It reports
// whether the page was read.
func (s *Store) resync(ph uint32, out *Output) bool {
	s.markDirty(ph)
	p := s.pages.at(ph)
	if p.refs == 0 {
		return true
	}
	vm := s.nodes.at(p.head).root.VM
	w, res := s.readPage(p, vm.Mem)
	if res == proofStale {
		// The page cannot be read or lost its protection: its tables
		// are being unhooked; keep acting on nothing until they are.
		s.st.Unsure++
		return false
	}
	if res != proofOK || !s.proveNodes(ph, p.vw, w, out) {
		return false
	}
	s.st.Resyncs++
	p = s.pages.at(ph)
	if p.refs == 0 {
		return true
	}
	esz := uint64(p.esz)
	shadow := s.shadows.at(ph)
	for off := uint64(0); off < PageSize; off += esz {
		old, new := getEntry(shadow[off:], p.esz), getEntry(s.tmp[off:], p.esz)
		if old == new {
			continue
		}
		for h := p.head; h != 0; h = s.nodes.at(h).next {
			if i := index(s.nodes.at(h), off, p.esz); i >= 0 {
				s.step(h, i, old, new, out)
			}
		}
	}
	for h := p.head; h != 0; h = s.nodes.at(h).next {
		n := s.nodes.at(h)
		if n.relink == 0 {
			continue
		}
		from, to := 0, scope(n)
		if n.relink != relinkAll {
			from, to = int(n.relink)-1, int(n.relink)
		}
		n.relink = 0
		for i := from; i < to; i++ {
			e := getEntry(s.tmp[uint64(n.off)+uint64(i)*esz:], p.esz)
			if n.root.Mode.Classify(e, int(n.level)) == KindTable && !n.root.Stopped() {
				s.emitHook(n, i, e, true, out)
			}
		}
	}
	*shadow = s.tmp
	p.reads++
	if p.vw != nil {
		p.rseq = guestmem.Count(w)
		p.seq, p.last = p.rseq, 0
	}
	s.dropPending(ph, &s.st.FlushedPartial)
	s.clean(ph)
	return true
}

// clean takes page ph off the dirty list.
func (s *Store) clean(ph uint32) {
	p := s.pages.at(ph)
	if !p.dirty {
		return
	}
	p.dirty = false
	for i, d := range s.dirty {
		if d == ph {
			s.dirty[i] = s.dirty[len(s.dirty)-1]
			s.dirty = s.dirty[:len(s.dirty)-1]
			return
		}
	}
}

// Retry reads again the pages whose reads were given up (guest memory kept
// changing under them) and returns how many are still waiting.
func (s *Store) Retry(out *Output) int {
	for i := len(s.dirty) - 1; i >= 0; i-- {
		if i < len(s.dirty) {
			s.resync(s.dirty[i], out)
		}
	}
	return len(s.dirty)
}

// Dirty returns how many pages wait to be read again.
func (s *Store) Dirty() int { return len(s.dirty) }

// FlushRoot ends the partial writes of root r's tables (SEMANTICS.md
// section 3: "its root stopped or dumped"): every pending write on a page
// that holds a table of r is completed with the bytes it has, and every
// such page waiting to be read again is read. Partial writes of other
// roots' pages go on: another vCPU may be between the two halves of an
// entry (PAE), and ending its write early would leave its second half
// pending alone. It returns how many of r's pages still wait to be read.
func (s *Store) FlushRoot(r *Root, out *Output) int {
	for again := true; again; {
		again = false
		for i := len(s.pend) - 1; i >= 0; i-- {
			if i >= len(s.pend) || !s.holds(s.pend[i].page, r) {
				continue
			}
			pr := s.takePending(i)
			s.st.FlushedPartial++
			s.complete(pr.page, uint64(pr.off), pr.base, pr.val, 0, out)
			again = true // (completing may have changed the list)
		}
	}
	waiting := 0
	for i := len(s.dirty) - 1; i >= 0; i-- {
		if i >= len(s.dirty) || !s.holds(s.dirty[i], r) {
			continue
		}
		if !s.resync(s.dirty[i], out) {
			waiting++
		}
	}
	return waiting
}

// holds reports whether page ph holds a table of root r.
func (s *Store) holds(ph uint32, r *Root) bool {
	for h := s.pages.at(ph).head; h != 0; h = s.nodes.at(h).next {
		if s.nodes.at(h).root == r {
			return true
		}
	}
	return false
}

// Flush brings the store to a quiescent point: every partial write ends with
// the bytes it has (SEMANTICS.md section 3) and every page waiting to be read
// again is read. It returns how many pages still wait (guest memory kept
// changing under them).
func (s *Store) Flush(out *Output) int {
	if len(s.polled) > 0 {
		s.poll(0, true, out)
	}
	for len(s.pend) > 0 {
		pr := s.takePending(len(s.pend) - 1)
		s.st.FlushedPartial++
		s.complete(pr.page, uint64(pr.off), pr.base, pr.val, 0, out)
	}
	return s.Retry(out)
}
