package vasmon

// Write floods (issue 19). A page-table page written faster than a
// threshold costs its VM's host a trap and an event per write; like KVM's
// shadow MMU, the store then stops write-protecting it and reads it now and
// then instead, reporting the difference (as a newly read table's): one
// guest cannot make the engine's cost grow without bound. Only pages that
// hold level-1 tables are polled (a table above would leave its subtree
// unprovable while its page is not protected); the others keep trapping,
// and the engine's fair ingest bounds what their VM costs its neighbours.
//
// The policy runs on trap times, like partial-write expiry: a page is
// flooded when Flood.Writes writes trapped within Flood.Window of each other
// reach it; a flooded page is read when an event of the store comes
// Flood.Interval after its last read, and at every Flush (a quiescent
// point, where the oracle holds); after Flood.Quiet reads that find it
// unchanged it is protected and trapped again.

// FloodPolicy is a store's write-flood policy. The zero value selects the
// defaults; Writes < 0 turns the policy off.
type FloodPolicy struct {
	Writes   int   // writes within Window that flood a page; 0: 20000
	Window   int64 // Write.Trap nanoseconds; 0: 10 ms
	Interval int64 // between reads of a flooded page; 0: 1 ms
	Quiet    int   // unchanged reads before a page is trapped again; 0: 16
}

func (f FloodPolicy) writes() int {
	if f.Writes == 0 {
		return 20000
	}
	return f.Writes
}

func (f FloodPolicy) window() int64 {
	if f.Window <= 0 {
		return 10_000_000
	}
	return f.Window
}

func (f FloodPolicy) interval() int64 {
	if f.Interval <= 0 {
		return 1_000_000
	}
	return f.Interval
}

func (f FloodPolicy) quiet() int {
	if f.Quiet <= 0 {
		return 16
	}
	return f.Quiet
}

// countFlood counts a write of page ph trapped at trap, and floods the page
// when the window's count reaches the threshold.
func (s *Store) countFlood(ph uint32, vm VMID, trap int64) {
	n := s.Flood.writes()
	if n < 0 {
		return
	}
	p := s.pages.at(ph)
	if trap-p.ft > s.Flood.window() || trap < p.ft {
		p.ft, p.fcount = trap, 0
	}
	p.fcount++
	if int(p.fcount) < n || p.refs == 0 || p.vw == nil {
		return
	}
	for h := p.head; h != 0; h = s.nodes.at(h).next {
		if s.nodes.at(h).level != 1 {
			return
		}
	}
	v := s.nodes.at(p.head).root.VM
	if v.Prot.Unprotect(p.pfn*PageSize) != nil {
		s.st.ProtectErrors++
		return
	}
	p.polled, p.quiet, p.ft = true, 0, trap
	s.polled = append(s.polled, ph)
	v.flooded.Add(1)
	s.st.Floods++
	_ = vm
}

// poll reads the flooded pages due (all of them with all) and makes their
// tables act on what changed.
func (s *Store) poll(trap int64, all bool, out *Output) {
	for i := 0; i < len(s.polled); i++ {
		ph := s.polled[i]
		p := s.pages.at(ph)
		if !all && trap-p.ft < s.Flood.interval() {
			continue
		}
		p.ft = trap
		reads := p.reads
		shadow := *s.shadows.at(ph)
		ok := s.resync(ph, out)
		if i >= len(s.polled) || s.polled[i] != ph {
			// The read found its tables no longer linked: the page
			// went, and the list moved.
			i--
			continue
		}
		if !ok {
			continue
		}
		s.st.Polls++
		if p.reads == reads {
			continue
		}
		if *s.shadows.at(ph) != shadow {
			p.quiet = 0
			continue
		}
		if p.quiet++; int(p.quiet) >= s.Flood.quiet() {
			s.unpoll(ph, out)
			i--
		}
	}
}

// unpoll protects a flooded page again and reads it; it reports whether
// the page is trapped again.
func (s *Store) unpoll(ph uint32, out *Output) bool {
	p := s.pages.at(ph)
	if p.refs == 0 {
		return false
	}
	v := s.nodes.at(p.head).root.VM
	if v.Prot.Protect(p.pfn*PageSize) != nil {
		s.st.ProtectErrors++
		return false
	}
	s.unpolled(v, ph)
	p.ft, p.fcount = 0, 0
	// Writes made while it was not protected are in no event: read it.
	return s.resync(ph, out)
}

// unpolled takes page ph off the polled list.
func (s *Store) unpolled(v *VM, ph uint32) {
	p := s.pages.at(ph)
	p.polled = false
	v.flooded.Add(-1)
	for i, q := range s.polled {
		if q == ph {
			s.polled[i] = s.polled[len(s.polled)-1]
			s.polled = s.polled[:len(s.polled)-1]
			return
		}
	}
}
