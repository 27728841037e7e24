package explore

import (
	"errors"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// The guest's vCPU: stores of every kind a CPU makes into the pool of
// table pages (whole entries, halves in any order, narrow bit operations,
// stores across an entry or a page boundary, A/D-only updates, duplicate
// deliveries of a trap), and Linux's reuse of a freed table page as data.
// Its traps (the stores to protected pages) are submitted asynchronously,
// a few at a time (as a backend's ring lags), or synchronously. Each
// operation runs on one of two vCPUs, whose rings are submitted at
// different times: a trap may reach the engine after the later traps of
// the other vCPU, stamped after it (as with a real multi-vCPU guest). Some
// traps are stamped after their store (as a QEMU plugin's are), which
// makes the engine prove their values on guest memory.
//
// So that the ground truth stays small whatever the guest writes, only a
// few entries of a page may link tables (linkable); every present value
// stored elsewhere has PS set, which makes it a leaf or a reserved entry
// at every level, never a link.

// writer is the vCPU actor.
func (v *vmState) writer() {
	w := v.w
	defer func() {
		v.flush()
		v.done = true
	}()
	for k := 0; k < w.cfg.Writes; k++ {
		for v.pause {
			v.flush()
			v.paused = true
			w.s.yield()
		}
		v.paused = false
		sync := w.cfg.Sync && w.pick(3) == 0
		if sync {
			v.flush()
		}
		cpu := 0
		if w.pick(4) == 0 {
			cpu = 1
		}
		v.buf = &v.bufs[cpu]
		v.op(sync)
		if w.pick(3) == 0 {
			v.flushCPU(0)
		}
		if w.pick(7) == 0 {
			v.flushCPU(1)
		}
		if w.pick(2) == 0 {
			w.s.yield()
		}
	}
}

// linkable reports whether entry i of a page may link a table.
func (v *vmState) linkable(i int) bool {
	if v.mode == vasmon.ModePAE {
		return i < 12 && i%4 < 3 // the PAE roots at offsets 0, 32 and 64 included
	}
	return i < 3
}

// fix makes e a value entry i may hold: present without PS only where a
// link may be.
func (v *vmState) fix(i int, e uint64) uint64 {
	if !v.linkable(i) && e&vasmon.BitP != 0 {
		e |= vasmon.BitPS
	}
	if v.mode.EntryBytes() == 4 {
		e &= 0xFFFFFFFF
	}
	return e
}

func (v *vmState) entry(t uint64, i int) uint64 { return v.g.Entry(t, i) }

// index picks an entry of a table page.
func (v *vmState) index() int {
	w := v.w
	last := v.mode.Entries(1) - 1
	if w.pick(2) == 0 {
		if v.mode == vasmon.ModePAE {
			return []int{0, 1, 2, 4, 5, 6, 8, 9, 10}[w.pick(9)]
		}
		return w.pick(3)
	}
	return []int{3, 4, 5, 7, 255, 256, last - 1, last}[w.pick(8)]
}

// value picks a new value of entry i (currently cur).
func (v *vmState) value(i int, cur uint64) uint64 {
	w := v.w
	var e uint64
	switch w.pick(10) {
	case 0:
		e = 0
	case 1: // not present: swap bits
		e = uint64(w.pick(1<<12)) << 12
	case 2, 3: // a leaf (a large one where PS is valid)
		e = v.leafAt(1, uint64(w.pick(1<<8))<<21|uint64(w.pick(8))<<12)
		if w.pick(3) == 0 {
			e |= vasmon.BitNX
		}
		if v.linkable(i) && w.pick(2) == 0 {
			e &^= vasmon.BitPS
		}
	case 4, 5: // a table of the pool
		e = v.link(v.pool[w.pick(poolPages)], 2)
		if w.pick(4) == 0 {
			e |= vasmon.BitA
		}
	case 6: // A or D only
		e = cur ^ vasmon.BitA<<w.pick(2)
	case 7: // a monitored permission
		e = cur ^ []uint64{vasmon.BitRW, vasmon.BitUS, vasmon.BitNX, 1 << 12}[w.pick(4)]
	case 8: // outside RAM
		e = (ramBytes+uint64(w.pick(64))<<12)&^0xFFF | vasmon.BitP | vasmon.BitRW
	default: // PS flipped
		e = cur ^ vasmon.BitPS
	}
	return v.fix(i, e)
}

// op makes one guest operation.
func (v *vmState) op(sync bool) {
	w := v.w
	esz := v.mode.EntryBytes()
	t := v.pool[w.pick(poolPages)]
	i := v.index()
	gpa := t + uint64(i*esz)
	cur := v.entry(t, i)
	kind := w.pick(9)
	if kind == 8 && !w.cfg.Reuse {
		kind = 0
	}
	switch kind {
	case 0, 1: // a whole entry
		v.store(gpa, esz, v.value(i, cur), sync)
	case 2: // two parts in either order (halves; 3+1 bytes of a 4-byte entry)
		nv := v.value(i, cur)
		cut := esz / 2
		if esz == 4 {
			cut = 1 + 2*w.pick(2) // 1+3 or 3+1
		}
		parts := [][2]int{{0, cut}, {cut, esz}}
		if w.pick(2) == 0 {
			parts[0], parts[1] = parts[1], parts[0]
		}
		for _, p := range parts {
			v.store(gpa+uint64(p[0]), p[1]-p[0], nv>>(8*p[0]), sync)
			if w.pick(2) == 0 {
				w.s.yield()
			}
		}
	case 3: // a narrow bit operation: 1 or 2 bytes in place
		n := 1 + w.pick(2)
		off := w.pick(esz - n + 1)
		nv := v.value(i, cur)
		mask := uint64(1)<<(8*n) - 1
		merged := v.fix(i, cur&^(mask<<(8*off))|nv&(mask<<(8*off)))
		v.store(gpa+uint64(off), n, merged>>(8*off), sync)
	case 4, 5: // across an entry boundary (or, at the page's end, a page boundary)
		if i == v.mode.Entries(1)-1 && t == v.pool[poolPages-1] {
			i--
			gpa -= uint64(esz)
			cur = v.entry(t, i)
		}
		n := 2 + w.pick(7)
		off := 1 + w.pick(esz-1) // from byte off of entry i into entry i+1
		if off+n <= esz {
			n = esz - off + 1
		}
		n = min(n, 8, 2*esz-off)
		a := v.value(i, cur)
		j, tb := i+1, t
		if i == v.mode.Entries(1)-1 {
			j, tb = 0, t+vasmon.PageSize
		}
		b := v.fix(j, v.value(j, v.entry(tb, j)))
		both := a | b<<(8*esz)
		if esz == 8 {
			// (bytes off.. of a, then b's low bytes)
			data := a>>(8*off) | b<<(8*(8-off))
			v.store(gpa+uint64(off), n, data, sync)
			return
		}
		v.store(gpa+uint64(off), n, both>>(8*off), sync)
	case 6: // A/D only, as software clears them
		v.store(gpa, esz, v.fix(i, cur^vasmon.BitA<<w.pick(2)), sync)
	case 7: // a trap delivered twice (the same RIP, bytes and stamp)
		v.store(gpa, esz, v.value(i, cur), sync)
		if b := v.buf; len(*b) > 0 && !sync {
			*b = append(*b, (*b)[len(*b)-1])
			w.stats.Traps++
		}
	case 8: // free a linked table and reuse its page as data at once
		v.reuse()
	}
}

// reuse unlinks a table linked from the pool and fills its page with data.
func (v *vmState) reuse() {
	w := v.w
	esz := v.mode.EntryBytes()
	for try := 0; try < 8; try++ {
		t := v.pool[w.pick(poolPages)]
		i := v.index()
		if !v.linkable(i) {
			continue
		}
		e := v.entry(t, i)
		if e&vasmon.BitP == 0 || e&vasmon.BitPS != 0 {
			continue
		}
		child := e & 0x000FFFFFFFFFF000
		if esz == 4 {
			child &= 0xFFFFF000
		}
		if child < poolBase || child >= poolBase+poolPages*vasmon.PageSize {
			continue
		}
		v.store(t+uint64(i*esz), esz, 0, false)
		// The page's new life: counters, pointers, text.
		for k := 0; k < 3+w.pick(5); k++ {
			j := v.index()
			d := uint64(w.pick(1 << 16))
			switch w.pick(3) {
			case 0:
				d = 0x3534333231303d73 // text
			case 1:
				d = 0x7ffc7ff0ff81 // a pointer
			}
			v.store(child+uint64(j*esz), esz, v.fix(j, d), false)
		}
		return
	}
}

// store makes one guest store and, if it trapped, its event.
func (v *vmState) store(gpa uint64, size int, data uint64, sync bool) {
	w := v.w
	v.rip++
	wr := v.g.Store(gpa, size, data, v.rip)
	w.stats.Stores++
	last := gpa + uint64(size) - 1
	if v.now[gpa&^(vasmon.PageSize-1)] || v.now[last&^(vasmon.PageSize-1)] {
		v.truth()
	}
	w.s.note("VM %d store %#x/%d = %#x (ver %d/%d)", v.id, gpa, size, data, wr.Ver, wr.Ver2)
	if wr.Ver == 0 && wr.Ver2 == 0 {
		return // not a protected page: no trap
	}
	w.stats.Traps++
	v.clock += int64(w.pick(30))
	ev := shard.Event{GPA: wr.GPA, Data: wr.Data, Old: wr.Old, RIP: wr.RIP, Size: wr.Size, HasOld: wr.HasOld,
		Ver: wr.Ver, Ver2: wr.Ver2, Trap: v.clock + 1, Stamped: wr.Stamped && v.clock%3 != 0}
	if !sync {
		v.serialize(ev)
		*v.buf = append(*v.buf, ev)
		return
	}
	v.submitSync(ev, gpa, size, wr)
}

// submitSync submits one trap synchronously; on Deny it restores the old
// bytes (a store of its own, submitted synchronously too).
func (v *vmState) submitSync(ev shard.Event, gpa uint64, size int, wr vasmon.Write) {
	w := v.w
	if v.removed {
		return
	}
	if v.syncer == nil {
		s, err := w.e.NewSyncer(v.id)
		if err != nil {
			if !(w.closed && errors.Is(err, engine.ErrClosed)) {
				w.s.fail(err)
			}
			return
		}
		v.syncer = s
	}
	verdict, err := v.syncer.SubmitOne(ev)
	w.s.note("VM %d sync submit %#x: %v %v", v.id, ev.GPA, verdict, err)
	if err != nil {
		if !errors.Is(err, engine.ErrClosed) && !errors.Is(err, vasmon.ErrUnknownVM) {
			w.s.fail(err)
		}
		return
	}
	if verdict != shard.Deny || wr.Size != uint8(v.mode.EntryBytes()) || !wr.HasOld || gpa%uint64(v.mode.EntryBytes()) != 0 {
		return
	}
	// Refused: the store must not take effect. Restore the entry.
	v.rip++
	back := v.g.Store(gpa, size, wr.Old, v.rip)
	v.truth()
	if back.Ver == 0 {
		return
	}
	v.clock++
	rev := shard.Event{GPA: back.GPA, Data: back.Data, Old: back.Old, RIP: back.RIP, Size: back.Size, HasOld: true,
		Ver: back.Ver, Trap: v.clock + 1, Stamped: back.Stamped}
	if _, err := v.syncer.SubmitOne(rev); err != nil && !errors.Is(err, vasmon.ErrUnknownVM) && !errors.Is(err, engine.ErrClosed) {
		w.s.fail(err)
	}
}

// serialize submits the other vCPU's traps first if one of them writes an
// entry that ev writes: the engine applies the writes of one entry in the
// order of their submissions, so a backend serializes the submissions of
// stores to one entry, as the CPU serialized the stores (package engine,
// "Ordering").
func (v *vmState) serialize(ev shard.Event) {
	other := 0
	if v.buf == &v.bufs[0] {
		other = 1
	}
	esz := uint64(v.mode.EntryBytes())
	lo, hi := ev.GPA/esz, (ev.GPA+uint64(ev.Size)-1)/esz
	for _, o := range v.bufs[other] {
		if o.GPA/esz <= hi && (o.GPA+uint64(o.Size)-1)/esz >= lo {
			v.flushCPU(other)
			return
		}
	}
}

// flush submits the traps buffered on both vCPUs.
func (v *vmState) flush() {
	v.flushCPU(0)
	v.flushCPU(1)
}

// flushCPU submits the traps buffered on vCPU c.
func (v *vmState) flushCPU(c int) {
	b := v.bufs[c]
	if len(b) == 0 {
		return
	}
	w := v.w
	n, err := w.e.Submit(v.id, b)
	w.s.note("VM %d vCPU %d submit %d events: %d %v", v.id, c, len(b), n, err)
	if err != nil && !errors.Is(err, vasmon.ErrUnknownVM) && !(w.closed && errors.Is(err, engine.ErrClosed)) {
		w.s.fail(err)
	}
	v.bufs[c] = b[:0]
}
