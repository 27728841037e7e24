package vasmon

import (
	"sort"

	"github.com/vasengine/vasengine/guestmem"
)

// Exec executes one request. For a hook it returns what the hook did; for
// the other requests 0.
func (s *Store) Exec(req *Request, out *Output) HookResult {
	switch req.Op {
	case OpHook:
		return s.Hook(req, out)
	case OpUnhook:
		s.Unhook(req, out)
	case OpDropped:
		s.dropped(req, out)
	}
	return 0
}

// linked reports whether entry i of node n has a hooked (admitted) link.
func (s *Store) linked(n *node, i int) bool {
	return n.links != 0 && s.links.at(n.links).bits[i/64]&(1<<(i%64)) != 0
}

// emitHook appends a hook request for the table that entry i (value e) of
// node n links, unless it is outside RAM, a self-reference, or over a
// budget.
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
	// Reserve, then check: a hook turns its admission into a table
	// (tables first, then admitted), so tables read after the reservation
	// never misses one that left admitted; concurrent emitters (shards)
	// cannot both take the last place.
	vm := r.VM
	ra, va := r.admitted.Add(1), vm.admitted.Add(1)
	if r.tables.Load()+ra > r.Opts.MaxTables || vm.tables.Load()+va > vm.MaxTables {
		r.admitted.Add(-1)
		vm.admitted.Add(-1)
		r.refuseN(1, &req)
		return
	}
	s.links.at(n.links).bits[i/64] |= 1 << (i % 64)
	out.Reqs = append(out.Reqs, req)
}

// Dropped tells the store that an executor drops hook request req, emitted
// by a step, without running it (its parent changed meanwhile, or its root
// stopped), so that it no longer counts against the budgets.
func Dropped(req *Request) {
	if req.Op == OpHook && int(req.Level) < req.Root.Mode.Levels() {
		req.Root.admitted.Add(-1)
		req.Root.VM.admitted.Add(-1)
	}
}

// emitUnhook appends an unhook request for the table that entry i (value e)
// of node n linked, if its hook was admitted, and reports whether it did.
func (s *Store) emitUnhook(n *node, i int, e uint64, out *Output) bool {
	if n.links == 0 {
		return false
	}
	ls, bit := s.links.at(n.links), uint64(1)<<(i%64)
	if ls.bits[i/64]&bit == 0 {
		return false
	}
	ls.bits[i/64] &^= bit
	r := n.root
	out.Reqs = append(out.Reqs, Request{
		Root: r, GPA: r.Mode.TableAddr(e), VA: r.Mode.EntryVA(n.va, int(n.level), i),
		Level: n.level - 1, PGen: n.gen, Op: OpUnhook,
	})
	return true
}

// Hook is the hook step: it hooks the table of req, protecting its page if
// it is the page's first table and reading it from guest memory (a page
// already hooked is read again unless its shadow is current), proves that
// guest memory links the table at its place (see package documentation, "No
// phantoms"), reports its present leaves if req.Report, and appends a hook
// request for every table it links.
func (s *Store) Hook(req *Request, out *Output) HookResult {
	res := s.hook(req, out)
	return res
}

func (s *Store) hook(req *Request, out *Output) HookResult {
	// The request was admitted against the budgets when it was emitted
	// (emitHook): it becomes a table (counted before the admission is
	// given back, so the sum the emitters check never dips), or nothing.
	r := req.Root
	if r.Stopped() {
		Dropped(req)
		return Ignored
	}
	if prev := s.findPlace(r, req.Level, req.VA); prev != 0 {
		Dropped(req)
		pn := s.nodes.at(prev)
		if pn.pgen == req.PGen && s.pages.at(pn.page).pfn == req.GPA/PageSize && uint64(pn.off) == req.GPA%PageSize {
			// The same link delivered twice: already done.
			s.st.HookDuplicates++
			return Duplicate
		}
		s.st.Collisions++
		return Collision
	}
	vm := r.VM
	if r.tables.Add(1) > r.Opts.MaxTables {
		r.tables.Add(-1)
		Dropped(req)
		r.refuse(req)
		return Refused
	}
	if vm.tables.Add(1) > vm.MaxTables {
		r.tables.Add(-1)
		vm.tables.Add(-1)
		Dropped(req)
		r.refuse(req)
		return Refused
	}
	Dropped(req)
	// undo gives the table back; a request to run again (Unsure) is
	// admitted again first.
	undo := func(again bool) {
		if again && int(req.Level) < r.Mode.Levels() {
			r.admitted.Add(1)
			vm.admitted.Add(1)
		}
		r.tables.Add(-1)
		vm.tables.Add(-1)
	}
	m := r.Mode
	esz := uint8(m.EntryBytes())
	pfn := req.GPA / PageSize
	ph := s.findPage(vm.Key, pfn)
	fresh := ph == 0
	var w uint64 // the page's version word under which it was read
	if fresh {
		var res proof
		ph, w, res = s.newPage(vm, pfn, esz)
		switch res {
		case proofUnsure:
			undo(true)
			return Unsure
		case proofStale:
			undo(false)
			r.stats.outOfRAM.Add(1)
			return Failed
		}
	} else {
		p := s.pages.at(ph)
		if p.esz != esz {
			// A page cannot hold tables of different entry sizes in a sane
			// guest; refuse rather than mix write states.
			undo(false)
			r.stats.reserved.Add(1)
			return Failed
		}
		if p.polled && req.Level > 1 {
			// Only pages of level-1 tables are polled: trap this one
			// again before it holds a table above.
			if !s.unpoll(ph, out) || s.findPage(vm.Key, pfn) != ph {
				undo(true)
				return Unsure
			}
			p = s.pages.at(ph)
		}
		if p.vw != nil {
			w = p.vw.Load()
		}
		if p.vw != nil && !p.isCurrent(w) || p.vw == nil && p.npend > 0 {
			{
				// Writes of the page are still queued: the new table
				// starts from guest memory, and so do the others.
				if !s.resync(ph, out) || s.findPage(vm.Key, pfn) != ph {
					undo(true)
					return Unsure
				}
				if p := s.pages.at(ph); p.vw != nil {
					w = p.vw.Load()
					if !p.isCurrent(w) && !p.polled { // (a polled page is as read)
						undo(true)
						return Unsure
					}
				}
			}
		}
	}
	p := s.pages.at(ph)
	n := node{root: r, va: req.VA, anc: req.Anc, page: ph, pgen: req.PGen, off: uint16(req.GPA % PageSize), level: req.Level}
	if p.vw == nil {
		w = 0
	}
	var res proof
	if w != 0 {
		res = s.chain(&n, p.vw, w)
	} else {
		res = s.chain(&n, nil, 0)
	}
	if res != proofOK {
		undo(res == proofUnsure)
		if fresh {
			s.dropPage(vm, ph)
		}
		if res == proofUnsure {
			return Unsure
		}
		s.st.StaleReads++
		q := *req
		q.Op = OpDropped
		out.Reqs = append(out.Reqs, q)
		return Stale
	}
	p.mon |= r.Monitored | m.structuralMask()
	p.refs++
	nh := s.nodes.alloc()
	np := s.nodes.at(nh)
	*np = n
	np.next, np.gen = p.head, r.gen.Add(1)
	if req.Level > 1 {
		np.links = s.links.alloc() // released zeroed
	}
	if p.head != 0 {
		s.nodes.at(p.head).prev = nh
	}
	p.head = nh
	s.byPlace.insert(placeHash(r, req.Level, req.VA), nh)
	s.st.Hooks++

	level := int(req.Level)
	size := m.EntrySpan(level)
	for i, lim := 0, scope(np); i < lim; i++ {
		e := s.entry(ph, uint64(np.off)+uint64(i)*uint64(esz), esz)
		switch m.Classify(e, level) {
		case KindTable:
			s.emitHook(np, i, e, req.Report, out)
		case KindReserved:
			r.stats.reserved.Add(1)
		case KindLeaf:
			if req.Report && !r.Opts.HVMICompat {
				s.call(out, r, m.EntryVA(np.va, level, i), 0, e, size)
			}
		}
	}
	return Hooked
}

// newPage starts tracking a guest page: protect it, then read it, so that no
// write falls between the read and the protection unseen. With versions the
// read is proven to be one state of the protected page, and the page's
// version word under which it was read is returned.
func (s *Store) newPage(vm *VM, pfn uint64, esz uint8) (uint32, uint64, proof) {
	gpa := pfn * PageSize
	if err := vm.Prot.Protect(gpa); err != nil {
		s.st.ProtectErrors++
		return 0, 0, proofStale
	}
	ph := s.pages.alloc()
	s.shadows.ensure(ph)
	p := s.pages.at(ph)
	*p = page{pfn: pfn, vm: vm.Key, esz: esz}
	if vm.vers != nil {
		p.vw = vm.vers.Word(gpa)
		if p.vw == nil || p.vw.Load()&guestmem.VerProtected == 0 {
			// The backend's versions do not cover the page, or its
			// protector does not keep them: refuse loudly.
			s.st.ProtectErrors++
			s.abandon(vm, ph)
			return 0, 0, proofStale
		}
	}
	w, res := s.readPage(p, vm.Mem)
	if res != proofOK {
		s.abandon(vm, ph)
		return 0, 0, res
	}
	*s.shadows.at(ph) = s.tmp
	p.rseq, p.seq, p.last = guestmem.Count(w), guestmem.Count(w), 0
	s.byPage.insert(pageHash(vm.Key, pfn), ph)
	return ph, w, proofOK
}

// abandon releases a page that newPage could not start tracking.
func (s *Store) abandon(vm *VM, ph uint32) {
	if vm.Prot.Unprotect(s.pages.at(ph).pfn*PageSize) != nil {
		s.st.ProtectErrors++
	}
	s.pages.release(ph)
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

// Unhook is the unhook step: it completes the partial writes of the
// table's page, removes the table of req (the one linked by the parent of
// generation req.PGen), reports its present leaves as removed and appends an
// unhook request for every table it links. The page is unprotected when its
// last table goes.
func (s *Store) Unhook(req *Request, out *Output) {
	nh := s.unhookTarget(req)
	if nh == 0 {
		s.st.UnhookMisses++
		return
	}
	if ph := s.nodes.at(nh).page; s.pages.at(ph).npend > 0 {
		s.completePage(ph, out)
		if nh = s.unhookTarget(req); nh == 0 {
			return // found not linked and unhooked early meanwhile
		}
	}
	s.unhookNode(nh, out)
}

// unhookTarget returns the node that unhook request req removes, or 0 if
// that table is not hooked here.
func (s *Store) unhookTarget(req *Request) uint32 {
	nh := s.findPlace(req.Root, req.Level, req.VA)
	if nh != 0 {
		n := s.nodes.at(nh)
		if n.pgen != req.PGen || s.pages.at(n.page).pfn != req.GPA/PageSize {
			nh = 0
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
	for i, lim := 0, scope(n); i < lim; i++ {
		e := s.entry(n.page, uint64(n.off)+uint64(i)*esz, uint8(esz))
		switch m.Classify(e, level) {
		case KindTable:
			s.emitUnhook(n, i, e, out)
		case KindLeaf:
			s.call(out, r, m.EntryVA(n.va, level, i), e, 0, size)
		}
	}
	s.byPlace.remove(placeHash(r, n.level, n.va), nh)
	ph := n.page
	p := s.pages.at(ph)
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
		s.dropPending(ph, &s.st.FlushedPartial)
	}
	s.clean(ph)
	if p.polled {
		s.unpolled(vm, ph) // (not protected any more)
		s.pages.release(ph)
		if s.byPage.find(pageHash(p.vm, p.pfn), func(h uint32) bool { return h == ph }) == ph {
			s.byPage.remove(pageHash(p.vm, p.pfn), ph)
		}
		return
	}
	for i := range s.dups {
		if d := &s.dups[i]; d.vm == p.vm && d.egpa/PageSize == p.pfn {
			*d = dupChunk{}
		}
	}
	if vm.Prot.Unprotect(p.pfn*PageSize) != nil {
		s.st.ProtectErrors++
	}
	if p.refs > 0 || p.head != 0 {
		panic("vasmon: dropping a page that holds tables")
	}
	if s.byPage.find(pageHash(p.vm, p.pfn), func(h uint32) bool { return h == ph }) == ph {
		s.byPage.remove(pageHash(p.vm, p.pfn), ph)
	}
	s.pages.release(ph)
}

// parent returns the node of the parent of the table of req (the table of
// generation req.PGen one level up, hooked here and current) and the index
// of its entry that links the table, or 0.
func (s *Store) parent(req *Request) (uint32, int) {
	r := req.Root
	m := r.Mode
	pl := int(req.Level) + 1
	if pl > m.Levels() {
		return 0, 0
	}
	var pva uint64
	if pl < m.Levels() {
		pva = m.Canonical(req.VA &^ (uint64(m.Entries(pl))<<m.Shift(pl) - 1))
	}
	h := s.findPlace(r, uint8(pl), pva)
	if h == 0 || s.nodes.at(h).gen != req.PGen {
		return 0, 0
	}
	n := s.nodes.at(h)
	i := int((req.VA >> m.Shift(pl)) & uint64(m.Entries(pl)-1))
	if i >= scope(n) {
		return 0, 0
	}
	return h, i
}

// Linked reports whether the table that hook request req would hook is
// still linked by its parent in this store: the parent (the table of
// generation req.PGen one level up) is hooked here and its entry still
// points to req.GPA. An executor checks it, on the parent's store, before a
// hook request leaves it: a request whose parent was unhooked or re-pointed
// meanwhile must be dropped.
func (s *Store) Linked(req *Request) bool {
	if int(req.Level) == req.Root.Mode.Levels() {
		return true // a root table has no parent
	}
	h, i := s.parent(req)
	if h == 0 {
		return false
	}
	n := s.nodes.at(h)
	m := req.Root.Mode
	esz := uint64(m.EntryBytes())
	e := s.entry(n.page, uint64(n.off)+uint64(i)*esz, uint8(esz))
	return m.Classify(e, int(n.level)) == KindTable && m.TableAddr(e) == req.GPA
}

// dropped executes OpDropped on the parent's store: if the parent's entry
// still links req's table, its page is read again and the table hooked
// again if guest memory links it (a hook of the same link emitted meanwhile
// makes the second a duplicate, which is ignored).
func (s *Store) dropped(req *Request, out *Output) {
	h, i := s.parent(req)
	if h == 0 {
		return
	}
	n := s.nodes.at(h)
	m := req.Root.Mode
	esz := uint64(m.EntryBytes())
	e := s.entry(n.page, uint64(n.off)+uint64(i)*esz, uint8(esz))
	if m.Classify(e, int(n.level)) != KindTable || m.TableAddr(e) != req.GPA {
		return // the entry no longer links that table: nothing to hook again
	}
	if n.relink == 0 {
		n.relink = uint16(i + 1)
	} else if n.relink != uint16(i+1) {
		n.relink = relinkAll
	}
	s.resync(n.page, out)
}

// TableInfo describes one hooked table, as Dump returns it.
type TableInfo struct {
	Level   int
	GPA     uint64
	VA      uint64 // first VA mapped through the table
	Entries int    // entries in the table (in scope)
	Present int    // present entries in scope
	Writes  uint64 // writes seen on the table's page
}

// Dump appends the tables of r held by this store to dst and sorts them.
func (s *Store) Dump(r *Root, dst []TableInfo) []TableInfo {
	for h := uint32(1); h < s.nodes.next; h++ {
		n := s.nodes.at(h)
		if n.root != r {
			continue
		}
		p := s.pages.at(n.page)
		ti := TableInfo{Level: int(n.level), GPA: p.pfn*PageSize + uint64(n.off), VA: n.va,
			Entries: scope(n), Writes: uint64(p.writes)}
		esz := uint64(p.esz)
		for i := 0; i < ti.Entries; i++ {
			if s.entry(n.page, uint64(n.off)+uint64(i)*esz, p.esz)&BitP != 0 {
				ti.Present++
			}
		}
		dst = append(dst, ti)
	}
	SortTables(dst)
	return dst
}

// SortTables sorts a dump: highest level first, then by VA, then by GPA.
func SortTables(ts []TableInfo) {
	sort.Slice(ts, func(i, j int) bool {
		a, b := ts[i], ts[j]
		if a.Level != b.Level {
			return a.Level > b.Level
		}
		if a.VA != b.VA {
			return a.VA < b.VA
		}
		return a.GPA < b.GPA
	})
}

var hookResultNames = [...]string{"", "hooked", "refused", "failed", "ignored", "duplicate", "collision", "stale", "unsure"}

func (r HookResult) String() string {
	if int(r) < len(hookResultNames) && r != 0 {
		return hookResultNames[r]
	}
	return "none"
}
