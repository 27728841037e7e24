package vasmon

// Linked reports whether the table that hook request req would hook is
// still linked by its parent in this store: the parent (the table of
// generation req.PGen one level up) is hooked here, current, and its entry
// still points to req.GPA. An executor that delays a hook request (the
// sharded engine does, while unhooks of the same root are in flight) calls
// it, on the parent's store, before letting the request go: a request whose
// parent was unhooked or re-pointed meanwhile must be dropped.
func (s *Store) Linked(req *Request) bool {
	r := req.Root
	m := r.Mode
	pl := int(req.Level) + 1
	if pl > m.Levels() {
		return true // a root table has no parent
	}
	var pva uint64
	if pl < m.Levels() {
		pva = m.Canonical(req.VA &^ (uint64(m.Entries(pl))<<m.Shift(pl) - 1))
	}
	h := s.findPlace(r, uint8(pl), pva)
	if h == 0 {
		return false
	}
	n := s.nodes.at(h)
	if n.gen != req.PGen || n.stale {
		return false
	}
	i := int((req.VA >> m.Shift(pl)) & uint64(m.Entries(pl)-1))
	if i >= scope(n) {
		return false
	}
	esz := uint64(m.EntryBytes())
	e := s.entry(n.page, uint64(n.off)+uint64(i)*esz, uint8(esz))
	return m.Classify(e, pl) == KindTable && m.TableAddr(e) == req.GPA
}
