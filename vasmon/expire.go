package vasmon

// Pending returns the number of entry writes in progress and the earliest
// Write.Trap among them.
func (s *Store) Pending() (n int, oldest int64) {
	for i := range s.pend {
		if i == 0 || s.pend[i].trap < oldest {
			oldest = s.pend[i].trap
		}
	}
	return len(s.pend), oldest
}

// ExpirePending completes every entry write in progress whose first chunk
// was trapped before the given time with the entry's value in guest memory,
// running the per-table step from the value before the write to it, and
// returns how many it completed.
//
// It exists for asynchronous executors. A table hooked while one of its
// entries is half-written (the first chunk landed before the page was
// protected and read) receives only the later chunks, so by the rule of
// SEMANTICS.md section 3 the entry would never complete; the single-threaded
// Monitor, whose hooks are synchronous, never calls it.
func (s *Store) ExpirePending(before int64, out *Output) int {
	done := 0
	for i := 0; i < len(s.pend); {
		pr := s.pend[i]
		if pr.trap >= before {
			i++
			continue
		}
		s.pend[i] = s.pend[len(s.pend)-1]
		s.pend = s.pend[:len(s.pend)-1]
		p := s.pages.at(pr.page)
		p.npend--
		val := pr.val
		if p.head != 0 {
			var buf [8]byte
			mem := s.nodes.at(p.head).root.VM.Mem
			if mem.Read(p.pfn*PageSize+uint64(pr.off), buf[:p.esz]) == nil {
				val = 0
				for b := int(p.esz) - 1; b >= 0; b-- {
					val = val<<8 | uint64(buf[b])
				}
			}
		}
		s.complete(pr.page, uint64(pr.off), pr.base, val, out)
		done++
	}
	s.st.ExpiredPartial += uint64(done)
	return done
}
