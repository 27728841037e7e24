package vasmon_test

import (
	"testing"

	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// FuzzOracle decodes the fuzzer's bytes into a guest (mode, options, a few
// entries written before Start) and a sequence of stores on a small pool
// of table pages (which entry, what value, whole or in chunks in any order,
// with duplicate deliveries; stores across an entry or a page boundary;
// trap times that end pending partial writes), and checks at every
// quiescent point (after a Flush) the oracle, the hooked tables and the
// protections (harness.verify), and at the end that Stop reports every
// mapping removed and leaves nothing hooked or protected.
//
// Byte 0: bits 0-1 the mode, bit 2 FullSpace, bit 3 IgnoreNullPage, bit 4
// a narrow monitored set (RW only), bits 5-6 the PAE root's offset, bit 7
// unversioned guest memory. Byte 1: how many writes to make before Start
// (0-7). Then, per write: an op byte (bit 0-1: 0-1 whole, 2 split, 3 split
// with re-deliveries; bit 2: no Old; bits 3-7: table), an entry byte (bit 7:
// instead a store of 1-8 bytes across the end of the table's page, the
// value's low byte giving its size and offset), a value kind byte and its
// payload, and for splits a cut byte and an order byte, then a time byte
// (the trap clock advances by it, in units of a fifth of PendingTimeout;
// bit 7: no flush before the checks). Missing bytes read as zero. The pool
// starts as a chain from the root (entries 0 and 1 of each table link the
// next pool page).
func FuzzOracle(f *testing.F) {
	f.Add([]byte{0x02, 0x03, 0x0A, 0x00, 0x03, 0x01, 0x02, 0x08, 0x01, 0x02, 0x03})
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzRun(t, data)
	})
}

// fuzzBytes reads bytes, then zeros.
type fuzzBytes struct {
	data []byte
	n    int
}

func (b *fuzzBytes) byte() byte {
	if b.n >= len(b.data) {
		b.n++
		return 0
	}
	b.n++
	return b.data[b.n-1]
}

func (b *fuzzBytes) more() bool { return b.n < len(b.data) }

func (b *fuzzBytes) uint(n int) uint64 {
	var v uint64
	for i := 0; i < n; i++ {
		v |= uint64(b.byte()) << (8 * i)
	}
	return v
}

const fuzzPool = 6

// fuzzMaxWrites and fuzzMaxTables bound the work of one input.
const (
	fuzzMaxWrites = 200
	fuzzMaxTables = 40
)

func fuzzRun(t *testing.T, data []byte) {
	in := &fuzzBytes{data: data}
	b0 := in.byte()
	mode := vasmon.Modes[b0&3]
	// A small budget bounds the work of an input that aliases its pool
	// into a big tree (see the end of write).
	opts := vasmon.Options{FullSpace: b0&4 != 0, IgnoreNullPage: b0&8 != 0, MaxTables: fuzzMaxTables}
	monitored := uint64(monAll | vasmon.BitD)
	if b0&16 != 0 {
		monitored = rwBit
	}
	h := newHarnessMem(t, mode, b0&0x80 == 0)
	const timeout = 1000
	h.mon.Store().PendingTimeout = timeout
	var clock int64
	pool := make([]uint64, fuzzPool)
	for i := range pool {
		pool[i] = h.table()
	}
	cr3 := pool[0]
	if mode == vasmon.ModePAE {
		cr3 += uint64(b0>>5&3) * 32
	}
	// A chain root -> pool[1] -> ... through entries 0 and 1 of each
	// table, so that most writes land on hooked tables.
	for l := mode.Levels(); l > 1; l-- {
		t := pool[mode.Levels()-l]
		if l == mode.Levels() {
			t = cr3
		}
		next := pool[mode.Levels()-l+1]
		h.g.SetEntry(t, 0, h.link(next, l))
		h.g.SetEntry(t, 1, h.link(next, l))
	}
	esz := mode.EntryBytes()
	n := mode.Entries(1)
	idx := []int{0, 1, 2, 3, 5, n - 1}
	switch mode {
	case vasmon.Mode32:
		idx = append(idx, 511, 512, 513)
	case vasmon.Mode4, vasmon.Mode5:
		idx = append(idx, 255, 256, 0x1ED)
	}
	// The entry of a write: a table of the pool and an index, relative
	// to the PAE root's offset for the root page.
	entry := func(op, eb byte) (uint64, int) {
		p := int(op>>3) % fuzzPool
		i := idx[int(eb)%len(idx)]
		base := pool[p]
		if p == 0 {
			base = cr3
			if mode == vasmon.ModePAE {
				i %= 4
			}
		}
		return base, i
	}
	value := func(cur uint64) uint64 {
		var v uint64
		switch k := in.byte(); k % 12 {
		case 0:
			v = 0
		case 1: // not present, swap bits
			v = in.uint(2) << 12 &^ pBit
		case 2: // a leaf, large where PS is valid
			v = in.uint(2)<<21 | uint64(in.byte())&^psBit | pBit
			if k&0x80 != 0 {
				v |= psBit
			}
			if k&0x40 != 0 {
				v |= nxBit
			}
		case 3, 10, 11: // a table of the pool
			v = pool[int(in.byte())%fuzzPool] | pBit | rwBit | usBit | uint64(k>>7)*vasmon.BitA
		case 4: // a monitored bit
			v = cur ^ []uint64{rwBit, usBit, nxBit, 1 << 12}[k>>6]
		case 5: // A or D only
			v = cur ^ vasmon.BitA<<(k>>7)
		case 6: // outside RAM
			v = (hRAM+in.uint(1)<<12)<<(k>>7*8) | pBit | rwBit
		case 7: // PS flip
			v = cur ^ psBit
		case 8: // raw bytes
			v = in.uint(8)
		case 9: // the written table or the root itself (self-reference)
			v = pool[0] | pBit | rwBit
		}
		if esz == 4 {
			v &= 0xFFFFFFFF
		}
		return v
	}
	write := func(feed bool) (refused bool) {
		op := in.byte()
		eb := in.byte()
		table, i := entry(op, eb)
		gpa := table + uint64(i*esz)
		v := value(h.g.Entry(table, i))
		if !feed {
			h.g.SetEntry(table, i, v)
			return false
		}
		tb := in.byte()
		clock += int64(tb&0x7F) * timeout / 5
		switch {
		case eb&0x80 != 0:
			// Across the end of the page: size 1-8 from an offset 1-7
			// bytes before it.
			size := int(v&7) + 1
			back := max(1, int(v>>3&7))
			h.rip++
			w := h.g.Store(table+vasmon.PageSize-uint64(back), size, v>>8, h.rip)
			w.Trap = clock
			h.write(w)
		case op&3 < 2:
			w := h.g.SetEntry(table, i, v)
			w.HasOld = op&4 == 0
			w.Trap = clock
			h.write(w)
		default:
			// Chunks: cut where the bits of the cut byte say, written
			// in an order drawn from the order byte.
			cuts, order := in.byte(), in.byte()
			var chunks [][2]int
			lo := 0
			for c := 1; c < esz; c++ {
				if cuts&(1<<(c-1)) != 0 {
					chunks = append(chunks, [2]int{lo, c})
					lo = c
				}
			}
			chunks = append(chunks, [2]int{lo, esz})
			perm := make([]int, len(chunks))
			for k := range perm {
				perm[k] = k
			}
			for k := len(perm) - 1; k > 0; k-- {
				j := int(order) % (k + 1)
				order = order/3 + byte(k)*7
				perm[k], perm[j] = perm[j], perm[k]
			}
			cur := h.g.Entry(table, i)
			for k, c := range perm {
				a, b := chunks[c][0], chunks[c][1]
				h.rip++
				w := h.g.Store(gpa+uint64(a), b-a, v>>(8*a), h.rip)
				w.HasOld = w.HasOld && op&4 == 0
				w.Trap = clock
				kind := h.write(w)
				done, _ := chunkModel(esz, cur, v, chunks, perm[:k+1])
				before, _ := chunkModel(esz, cur, v, chunks, perm[:k])
				if len(done) == len(before) && kind != vasmon.WritePartial && kind != vasmon.WriteUntracked {
					t.Fatalf("chunk %d of %d classified %v", k, len(perm), kind)
				}
				if op&3 == 3 && kind == vasmon.WritePartial {
					if k := h.write(w); k != vasmon.WriteDuplicate {
						t.Fatalf("re-delivered chunk classified %v", k)
					}
					w = h.g.Store(gpa+uint64(a), b-a, v>>(8*a), h.rip+1000)
					w.Trap = clock
					if k := h.write(w); k != vasmon.WritePartial {
						t.Fatalf("chunk re-written by another RIP classified %v", k)
					}
				}
			}
		}
		if tb&0x80 == 0 {
			if err := h.mon.Flush(); err != nil {
				t.Fatal(err)
			}
		}
		for _, r := range h.roots {
			r.take(false, h.rec.Peek(r)...)
			if r.Stats().Refused > 0 {
				return true
			}
		}
		if tb&0x80 == 0 {
			h.verify()
		}
		return false
	}
	for k := int(in.byte() % 8); k > 0; k-- {
		write(false)
	}
	r := &hroot{h: h, oracle: true}
	root, err := h.mon.Start(1, cr3, mode, monitored, h.rec.Callback, r, opts)
	if err != nil {
		t.Fatal(err)
	}
	r.Root = root
	if evs := h.rec.Take(r); len(evs) != 0 {
		t.Fatalf("Start reported %v", evs)
	}
	if root.Stats().Refused > 0 {
		// The writes before Start made a tree past the budget.
		if err := h.mon.Stop(root); err != nil {
			t.Fatal(err)
		}
		if h.prot.Count() != 0 || h.mon.Store().Stats().Tables != 0 || h.mon.VM(1).Tables() != 0 || len(h.prot.Errors) != 0 {
			t.Fatalf("Stop past the budget: %d pages protected, %d tables, errors %v", h.prot.Count(), h.mon.Store().Stats().Tables, h.prot.Errors)
		}
		return
	}
	r.m = h.walk(r)
	h.roots = append(h.roots, r)
	h.verify()
	for k := 0; k < fuzzMaxWrites && in.more(); k++ {
		if write(true) {
			// Past the budget the monitor no longer sees the whole tree
			// (the walker would): Stop must still report removed exactly
			// the mappings reported before, and clean up.
			if err := h.mon.Stop(r.Root); err != nil {
				t.Fatal(err)
			}
			for _, e := range h.rec.Take(r) {
				k := vasmontest.Key{VA: e.VA, Size: e.Size}
				if e.New&pBit != 0 && mode.Classify(e.New, vasmontest.LevelOf(mode, e.Size)) == vasmon.KindLeaf {
					r.m[k] = e.New & r.Monitored // (a partial write ended by Stop)
					continue
				}
				if v, ok := r.m[k]; !ok || v != e.Old&r.Monitored || e.New != 0 {
					t.Fatalf("Stop past the budget reported %v; map holds %#x (%v)", e, v, ok)
				}
				delete(r.m, k)
			}
			if len(r.m) != 0 || h.prot.Count() != 0 || h.mon.Store().Stats().Tables != 0 || h.mon.VM(1).Tables() != 0 {
				t.Fatalf("Stop past the budget: %d mappings not removed, %d pages protected, %d tables",
					len(r.m), h.prot.Count(), h.mon.Store().Stats().Tables)
			}
			return
		}
	}
	if err := h.mon.Flush(); err != nil {
		t.Fatal(err)
	}
	r.take(false, h.rec.Peek(r)...)
	h.verify()
	st := h.mon.Store().Stats()
	t.Logf("%v %+v: writes by kind %v, hooks %d, unhooks %d, stats %+v", mode, opts, st.Writes, st.Hooks, st.Unhooks, r.Stats())
	r.stop()
	if h.prot.Count() != 0 || h.mon.Store().Stats().Tables != 0 {
		t.Fatalf("after Stop: %d pages protected, %d tables", h.prot.Count(), h.mon.Store().Stats().Tables)
	}
}
