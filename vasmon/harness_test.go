package vasmon_test

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// The harness of the rule, hostile and fuzz tests: one guest, one monitor,
// roots whose translation maps are kept by applying their callbacks, and a
// check that compares them with a full walk (the oracle) and compares the
// protected pages and the dumped tables with the tables a walk reaches.

const (
	hRAM  = 64 << 20 // guest RAM of the harness
	hBase = 1 << 20  // first table page

	pBit  = vasmon.BitP
	rwBit = vasmon.BitRW
	usBit = vasmon.BitUS
	psBit = vasmon.BitPS
	nxBit = vasmon.BitNX

	frameMask = 0x000FFFFFFFFFF000
	// monAll is the monitored set of most tests: permissions and frame.
	monAll = rwBit | usBit | nxBit | frameMask

	kb4 = 1 << 12
	mb2 = 1 << 21
	mb4 = 1 << 22
	gb1 = 1 << 30
)

type ev = vasmontest.Event

type harness struct {
	t     testing.TB
	mode  vasmon.Mode
	g     *vasmontest.Guest
	prot  *vasmontest.Protections
	mon   *vasmon.Monitor
	rec   *vasmontest.Recorder
	roots []*hroot
	rip   uint64
}

// hroot is a started root and the translation map built from its callbacks.
type hroot struct {
	*vasmon.Root
	h *harness
	m vasmontest.Map
	// oracle is false under HVMICompat, whose stream does not keep the map.
	oracle bool
}

func newHarness(t testing.TB, mode vasmon.Mode) *harness { return newHarnessMem(t, mode, true) }

// newHarnessMem returns a harness whose monitor reads versioned guest
// memory (vasmon.Versioned, as every backend's), or plain memory.
func newHarnessMem(t testing.TB, mode vasmon.Mode, versioned bool) *harness {
	g := vasmontest.NewGuest(mode, hRAM, hBase)
	h := &harness{t: t, mode: mode, g: g, prot: g.NewProtections(), mon: vasmon.NewMonitor(), rec: vasmontest.NewRecorder()}
	var mem vasmon.Memory = g.Mem
	if versioned {
		mem = g.Memory()
	}
	if err := h.mon.AddVM(1, mem, h.prot, 0); err != nil {
		t.Fatal(err)
	}
	return h
}

func (h *harness) table() uint64 { return h.g.AllocTable() }

// idx returns the index of va's entry in its table at level.
func (h *harness) idx(va uint64, level int) int {
	return int(va>>h.mode.Shift(level)) & (h.mode.Entries(level) - 1)
}

// tflags returns the flags of a table entry at level (PDPTEs have RW and
// US reserved).
func (h *harness) tflags(level int) uint64 {
	if h.mode == vasmon.ModePAE && level == 3 {
		return pBit
	}
	return pBit | rwBit | usBit
}

// link returns the entry value linking table t from a table at level.
func (h *harness) link(t uint64, level int) uint64 { return t | h.tflags(level) }

// leaf returns a leaf entry for frame at level (PS set above level 1).
func (h *harness) leaf(frame uint64, level int) uint64 {
	e := frame | pBit | rwBit | usBit
	if level > 1 {
		e |= psBit
	}
	return e
}

// path returns the table of the given level that maps va under cr3,
// creating the missing tables. With feed, the links are fed to the monitor
// (they link empty tables: nothing may be reported).
func (h *harness) path(cr3, va uint64, level int, feed bool) uint64 {
	m := h.mode
	t := m.RootGPA(cr3)
	for l := m.Levels(); l > level; l-- {
		i := h.idx(va, l)
		e := h.g.Entry(t, i)
		if m.Classify(e, l) == vasmon.KindTable {
			t = m.TableAddr(e)
			continue
		}
		if m.Classify(e, l) != vasmon.KindNone {
			h.t.Fatalf("path: entry %d of level %d table %#x is %#x", i, l, t, e)
		}
		nt := h.table()
		w := h.g.SetEntry(t, i, h.link(nt, l))
		if feed {
			h.write(w)
			h.quiet()
		}
		t = nt
	}
	return t
}

// start monitors cr3 and checks that Start reports nothing.
func (h *harness) start(cr3, monitored uint64, opts vasmon.Options) *hroot {
	h.t.Helper()
	r := &hroot{h: h, oracle: !opts.HVMICompat}
	root, err := h.mon.Start(1, cr3, h.mode, monitored, h.rec.Callback, r, opts)
	if err != nil {
		h.t.Fatalf("Start(%#x): %v", cr3, err)
	}
	r.Root = root
	if evs := h.rec.Take(r); len(evs) != 0 {
		h.t.Fatalf("Start reported %d callbacks: %v", len(evs), evs)
	}
	r.m = h.walk(r)
	h.roots = append(h.roots, r)
	h.verify()
	return r
}

func (h *harness) walk(r *hroot) vasmontest.Map {
	h.t.Helper()
	m, err := vasmontest.WalkRoot(h.g.Mem, r.Root)
	if err != nil {
		h.t.Fatal(err)
	}
	return m
}

// write feeds one write event to the monitor.
func (h *harness) write(w vasmon.Write) vasmon.WriteKind {
	h.t.Helper()
	k, err := h.mon.Write(1, w)
	if err != nil {
		h.t.Fatalf("Write(%+v): %v", w, err)
	}
	return k
}

// set writes entry i of table in one store and feeds it.
func (h *harness) set(table uint64, i int, v uint64) vasmon.WriteKind {
	h.t.Helper()
	return h.write(h.g.SetEntry(table, i, v))
}

// store writes size bytes at gpa with a fresh RIP and feeds it.
func (h *harness) store(gpa uint64, size int, v uint64) vasmon.WriteKind {
	h.t.Helper()
	h.rip++
	return h.write(h.g.Store(gpa, size, v, h.rip))
}

func evString(evs []ev) string {
	var b strings.Builder
	for _, e := range evs {
		fmt.Fprintf(&b, "\n    %v", e)
	}
	if len(evs) == 0 {
		b.WriteString(" (none)")
	}
	return b.String()
}

// expect checks that r's callbacks since the last check are exactly want, in
// order, then verifies the oracle and the hooked tables of every root.
func (r *hroot) expect(want ...ev) {
	r.h.t.Helper()
	r.take(true, want...)
	r.h.verify()
}

// expectSet is expect for streams whose order the contract leaves open
// (one write seen through several aliases of a table).
func (r *hroot) expectSet(want ...ev) {
	r.h.t.Helper()
	r.take(false, want...)
	r.h.verify()
}

// take checks r's callbacks against want (in order or as a multiset) and
// applies them to r's map, without verifying: for a write that reaches
// several roots, take all but the last root's.
func (r *hroot) take(ordered bool, want ...ev) {
	h := r.h
	h.t.Helper()
	got := h.rec.Take(r)
	g, w := got, want
	if !ordered {
		g, w = slices.Clone(got), slices.Clone(want)
		less := func(a, b ev) int {
			if a.VA != b.VA {
				return cmpU(a.VA, b.VA)
			}
			if a.Size != b.Size {
				return cmpU(a.Size, b.Size)
			}
			if a.Old != b.Old {
				return cmpU(a.Old, b.Old)
			}
			return cmpU(a.New, b.New)
		}
		slices.SortFunc(g, less)
		slices.SortFunc(w, less)
	}
	if !slices.Equal(g, w) {
		h.t.Fatalf("callbacks (ordered %v):%s\nwant:%s", ordered, evString(g), evString(w))
	}
	r.apply(got)
}

func cmpU(a, b uint64) int {
	if a < b {
		return -1
	}
	if a > b {
		return 1
	}
	return 0
}

func (r *hroot) apply(evs []ev) {
	vasmontest.Apply(r.m, r.Mode, r.Monitored, evs)
}

// quiet checks that no root got a callback, then verifies.
func (h *harness) quiet() {
	h.t.Helper()
	for _, r := range h.roots {
		if evs := h.rec.Take(r); len(evs) != 0 {
			h.t.Fatalf("unexpected callbacks:%s", evString(evs))
		}
	}
	h.verify()
}

// silent checks that no root got a callback, without verifying: while an
// entry is partially written guest memory is ahead of the monitor, so the
// oracle does not hold until the write completes.
func (h *harness) silent() {
	h.t.Helper()
	for _, r := range h.roots {
		if evs := h.rec.Peek(r); len(evs) != 0 {
			h.t.Fatalf("unexpected callbacks:%s", evString(evs))
		}
	}
}

// verify checks, for every live root, the oracle (the map built from the
// callbacks equals a full walk), that the monitor hooks exactly the tables a
// walk reaches (Dump against WalkTables, table counters), and that exactly
// the pages of those tables are write-protected, without protection errors.
func (h *harness) verify() {
	h.t.Helper()
	var sum int64
	pages := make(map[uint64]bool)
	for _, r := range h.roots {
		if r.Stopped() {
			continue
		}
		m, want, err := vasmontest.WalkBoth(h.g.Mem, vasmontest.ParamsOf(r.Root))
		if err != nil {
			h.t.Fatal(err)
		}
		if r.oracle {
			if d := vasmontest.Diff(m, r.m, 10); d != "" {
				h.t.Fatalf("%v root %#x: oracle violated: %s", h.mode, r.CR3, d)
			}
		}
		got := h.mon.Store().Dump(r.Root, nil)
		if d := diffTables(want, got); d != "" {
			h.t.Fatalf("%v root %#x: hooked tables differ from a walk's: %s", h.mode, r.CR3, d)
		}
		if r.Tables() != int64(len(want)) {
			h.t.Fatalf("root counts %d tables, a walk reaches %d", r.Tables(), len(want))
		}
		for _, t := range want {
			pages[t.GPA&^(vasmon.PageSize-1)] = true
		}
		sum += r.Tables()
	}
	if vm := h.mon.VM(1); vm != nil && vm.Tables() != sum {
		h.t.Fatalf("VM counts %d tables, its roots %d", vm.Tables(), sum)
	}
	if st := h.mon.Store().Stats(); int64(st.Tables) != sum {
		h.t.Fatalf("store holds %d tables, the roots %d", st.Tables, sum)
	}
	want := make([]uint64, 0, len(pages))
	for p := range pages {
		want = append(want, p)
	}
	slices.Sort(want)
	if got := h.prot.Pages(); !slices.Equal(got, want) {
		h.t.Fatalf("protected pages %#x, want %#x", got, want)
	}
	if len(h.prot.Errors) != 0 {
		h.t.Fatalf("protection errors: %v", h.prot.Errors)
	}
}

// diffTables compares the tables a walk reaches with a dump, as multisets of
// (level, GPA, VA).
func diffTables(want []vasmontest.Table, got []vasmon.TableInfo) string {
	type key struct {
		l       int
		gpa, va uint64
	}
	count := make(map[key]int)
	for _, t := range want {
		count[key{t.Level, t.GPA, t.VA}]++
	}
	for _, t := range got {
		count[key{t.Level, t.GPA, t.VA}]--
	}
	var lines []string
	for k, n := range count {
		switch {
		case n > 0:
			lines = append(lines, fmt.Sprintf("not hooked: level %d gpa %#x va %#x (x%d)", k.l, k.gpa, k.va, n))
		case n < 0:
			lines = append(lines, fmt.Sprintf("extra:      level %d gpa %#x va %#x (x%d)", k.l, k.gpa, k.va, -n))
		}
	}
	if len(lines) == 0 {
		return ""
	}
	sort.Strings(lines)
	if len(lines) > 10 {
		lines = append(lines[:10], fmt.Sprintf("... %d more", len(lines)-10))
	}
	return "\n  " + strings.Join(lines, "\n  ")
}

// stop stops r and checks that it reported exactly its present leaves as
// removed (any order), that it holds no table and that verify still holds
// for the other roots.
func (r *hroot) stop() {
	h := r.h
	h.t.Helper()
	full := vasmontest.ParamsOf(r.Root)
	full.Monitored = ^uint64(0)
	before, err := vasmontest.Walk(h.g.Mem, full)
	if err != nil {
		h.t.Fatal(err)
	}
	if err := h.mon.Stop(r.Root); err != nil {
		h.t.Fatal(err)
	}
	var want []ev
	for k, e := range before {
		want = append(want, ev{VA: k.VA, Old: e, New: 0, Size: k.Size})
	}
	if r.oracle {
		r.expectSet(want...)
		if len(r.m) != 0 {
			h.t.Fatalf("map holds %d mappings after Stop", len(r.m))
		}
	} else {
		h.rec.Take(r)
		h.verify()
	}
	if r.Tables() != 0 || !r.Stopped() || h.mon.Root(1, r.CR3) != nil {
		h.t.Fatalf("after Stop: %d tables, stopped %v", r.Tables(), r.Stopped())
	}
}

// forModes runs f for every paging mode.
func forModes(t *testing.T, f func(t *testing.T, mode vasmon.Mode)) {
	for _, mode := range vasmon.Modes {
		t.Run(mode.String(), func(t *testing.T) { f(t, mode) })
	}
}
