package vasmon

// Entry write state (SEMANTICS.md section 3): partial writes, narrow
// writes, duplicates and the end of every pending write.

// pend is the state of an entry write in progress (a partial write).
type pend struct {
	base, val uint64
	seq       uint64 // order of start (the oldest is forced first)
	trap      int64  // Write.Trap of the first chunk
	page      uint32
	off       uint16
	mask      uint8
}

// maxPending bounds the partial writes in progress per store; past it the
// oldest one is completed with the bytes it has (counted), so a guest that
// never completes its writes costs bounded memory.
const maxPending = 1024

// dupSlots is the size of a store's window of recent chunks, direct-mapped
// by entry: a chunk is a duplicate when it equals the last chunk applied to
// its entry and that chunk is still in the window.
const dupSlots = 64

// dupChunk is the last chunk applied to one entry.
type dupChunk struct {
	egpa, rip, data uint64
	vm              VMID
	lo, n           uint8
}

func dupSlot(vm VMID, egpa uint64) int { return int(hashKey(uint64(vm), egpa) % dupSlots) }

// writeEntry applies bytes [lo, lo+n) of the entry at eoff of page ph.
//
//   - A chunk that covers the whole entry completes it: new is the chunk.
//   - A narrow chunk (1 or 2 bytes: an atomic bit operation in place)
//     completes it at once: new is the current value (with a partial write's
//     bytes, if one is pending on the entry) with those bytes replaced.
//   - Any other chunk (a 4-byte half of an 8-byte entry) starts or extends
//     a partial write, which completes when every byte has been written,
//     or is forced by a later full or narrow write of the entry, by
//     expiry, an unhook, a read of the page or a flush.
//   - A chunk with a known RIP that equals the last chunk applied to the
//     entry (same RIP, offset, size and bytes) is a duplicate delivery:
//     ignored, whether or not that chunk completed the entry.
//
// stamp is the part's stamp when it was taken before the store
// (Write.Stamped), else 0; inSeq says the shadow of the page was guest
// memory just before the store (every earlier write of the page applied,
// none in progress, no partial write pending). A whole-entry chunk, and a
// narrow one in sequence, then wrote a value that is true right after the
// store: complete may prove it by the stamp alone (Store.linkedAt).
func (s *Store) writeEntry(vm VMID, ph uint32, eoff, lo, n, data uint64, w *Write, first bool, stamp uint32, inSeq bool, out *Output) WriteKind {
	p := s.pages.at(ph)
	esz := uint64(p.esz)
	bytesMask := uint64(1)<<(8*n) - 1
	if n == 8 {
		bytesMask = ^uint64(0)
	}
	val := data & bytesMask
	egpa := p.pfn*PageSize + eoff
	var d *dupChunk
	if w.RIP != 0 {
		d = &s.dups[dupSlot(vm, egpa)]
		if d.egpa == egpa && d.vm == vm && d.rip == w.RIP && d.lo == uint8(lo) && d.n == uint8(n) && d.data == val {
			return WriteDuplicate
		}
		*d = dupChunk{egpa: egpa, rip: w.RIP, data: val, vm: vm, lo: uint8(lo), n: uint8(n)}
	}
	bytesMask <<= 8 * lo
	val <<= 8 * lo

	pi := -1
	if p.npend > 0 {
		for i := range s.pend {
			if s.pend[i].page == ph && uint64(s.pend[i].off) == eoff {
				pi = i
				break
			}
		}
	}
	// The last value acted on, with the bits no table of the page
	// monitors taken from the backend's read of the entry (it may be
	// fresher in A/D). The bits acted on always come from the shadow: the
	// backend's read may be ahead of it (a write of the entry the store
	// could not apply yet, its page to be read again), and a change the
	// tables have not reported must not become their "old" value.
	cur := s.entry(ph, eoff, p.esz)
	if pi < 0 && first && w.HasOld {
		o := w.Old
		if esz == 4 {
			o &= 0xFFFFFFFF
		}
		cur = cur&p.mon | o&^p.mon
	}
	switch {
	case n == esz || n <= 2:
		old, base := cur, cur
		if pi >= 0 {
			pr := s.takePending(pi)
			old, base = pr.base, pr.val
		}
		if n != esz && (!inSeq || pi >= 0) {
			stamp = 0 // the other bytes are the shadow's, maybe not memory's
		}
		return s.complete(ph, eoff, old, base&^bytesMask|val, stamp, out)
	default:
		if pi < 0 {
			pi = s.addPend(ph, eoff, cur, max(w.Trap, w.Held), out)
		}
		pr := &s.pend[pi]
		pr.val = pr.val&^bytesMask | val
		pr.mask |= uint8(1)<<(n+lo) - uint8(1)<<lo
		if pr.mask != uint8(1)<<esz-1 {
			return WritePartial
		}
		done := s.takePending(pi)
		return s.complete(ph, eoff, done.base, done.val, 0, out)
	}
}

// addPend starts a partial write of the entry at eoff of page ph, whose
// value before it is base, and returns its index.
func (s *Store) addPend(ph uint32, eoff, base uint64, trap int64, out *Output) int {
	if s.pend == nil {
		s.pend = make([]pend, 0, maxPending)
	}
	if len(s.pend) == maxPending {
		// Complete the oldest in-progress write with the bytes it has.
		oldest := 0
		for i := range s.pend {
			if s.pend[i].seq < s.pend[oldest].seq {
				oldest = i
			}
		}
		pr := s.takePending(oldest)
		s.st.ForcedPartial++
		s.complete(pr.page, uint64(pr.off), pr.base, pr.val, 0, out)
	}
	if trap != 0 && (s.pendOld == 0 || trap < s.pendOld) {
		s.pendOld = trap // (a write of unknown trap time never expires)
	}
	s.pendSeq++
	s.pend = append(s.pend, pend{base: base, val: base, seq: s.pendSeq, trap: trap, page: ph, off: uint16(eoff)})
	s.pages.at(ph).npend++
	return len(s.pend) - 1
}

// takePending removes partial write i and returns it.
func (s *Store) takePending(i int) pend {
	pr := s.pend[i]
	s.pend[i] = s.pend[len(s.pend)-1]
	s.pend = s.pend[:len(s.pend)-1]
	s.pages.at(pr.page).npend--
	return pr
}

// expire completes, with the bytes they have, the partial writes whose
// first chunk was trapped more than PendingTimeout before trap.
func (s *Store) expire(trap int64, out *Output) {
	timeout := s.PendingTimeout
	if timeout <= 0 {
		timeout = DefaultPendingTimeout
	}
	limit := trap - timeout
	if s.pendOld == 0 || s.pendOld >= limit {
		return
	}
	var next int64
	for i := 0; i < len(s.pend); {
		pr := s.pend[i]
		if pr.trap == 0 || pr.trap >= limit {
			if pr.trap != 0 && (next == 0 || pr.trap < next) {
				next = pr.trap
			}
			i++
			continue
		}
		s.takePending(i)
		s.st.ExpiredPartial++
		s.complete(pr.page, uint64(pr.off), pr.base, pr.val, 0, out)
		// complete may have ended other partial writes (a read of
		// their page): start over.
		i = 0
		next = 0
	}
	s.pendOld = next
}

// completePage completes the partial writes of page ph with the bytes they
// have (an unhook of a table of the page).
func (s *Store) completePage(ph uint32, out *Output) {
	for i := 0; i < len(s.pend) && s.pages.at(ph).npend > 0; {
		if s.pend[i].page != ph {
			i++
			continue
		}
		pr := s.takePending(i)
		s.st.FlushedPartial++
		s.complete(ph, uint64(pr.off), pr.base, pr.val, 0, out)
		i = 0
	}
}

// dropPending forgets the partial writes of page ph (its bytes were read
// from guest memory, or it is no longer hooked), counting them in *n.
func (s *Store) dropPending(ph uint32, n *uint64) {
	for i := 0; i < len(s.pend) && s.pages.at(ph).npend > 0; {
		if s.pend[i].page == ph {
			s.takePending(i)
			*n++
			continue
		}
		i++
	}
}

// Pending returns the number of entry writes in progress.
func (s *Store) Pending() int { return len(s.pend) }
