// Package vasmontest is the test support of vasmon, shared by the monitor's,
// the engine's and the backends' tests: the oracle of SEMANTICS.md section 6
// (a reference walker that builds a root's translation map from guest memory,
// and a function that applies a callback stream to such a map), a small
// in-memory guest with a page-table builder for all four paging modes, and a
// reference-counting write-protection recorder.
//
// Nothing here is tuned for speed, and the walker is written independently
// of the monitor (recursive, straight from the paging rules) so that the two
// check each other.
package vasmontest

import (
	"encoding/binary"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/vasengine/vasengine/vasmon"
)

// Key names one mapping: its first VA and its page size.
type Key struct {
	VA, Size uint64
}

// Map is a translation map: every present leaf of a root, masked by the
// root's monitored bits.
type Map map[Key]uint64

// WalkParams are what the walker needs to know of a root.
type WalkParams struct {
	CR3       uint64
	Mode      vasmon.Mode
	Monitored uint64 // P is added
	Opts      vasmon.Options
}

// ParamsOf returns the walk parameters of a monitored root.
func ParamsOf(r *vasmon.Root) WalkParams {
	return WalkParams{CR3: r.CR3, Mode: r.Mode, Monitored: r.Monitored, Opts: r.Opts}
}

// Walk builds the translation map of a root by a full walk of guest memory,
// following the scope rules of SEMANTICS.md section 5: the user half unless
// FullSpace, tables outside RAM skipped, self-references (a table entry
// pointing to its own table's page or an ancestor's) not descended into, PS
// at a level where it is reserved treated as mapping nothing, VA 0 left out
// under IgnoreNullPage.
func Walk(mem vasmon.Memory, p WalkParams) (Map, error) {
	out := make(Map)
	mon := p.Monitored | vasmon.BitP
	err := walk(mem, p, func(va, size, e uint64) { out[Key{va, size}] = e & mon }, nil)
	if err != nil {
		return nil, err
	}
	return out, nil
}

// Table is one table reached by a walk: its level, its address (the 32-byte
// aligned PDPT address for a PAE root) and the first VA it maps.
type Table struct {
	Level   int
	GPA, VA uint64
}

// WalkTables returns every table a full walk of the root reaches, the root
// included, in walk order (depth first, by entry index). A page reached
// several times (aliases) appears once per occurrence. These are exactly the
// tables a monitor must hook.
func WalkTables(mem vasmon.Memory, p WalkParams) ([]Table, error) {
	var out []Table
	err := walk(mem, p, nil, func(t Table) { out = append(out, t) })
	return out, err
}

// WalkBoth returns what Walk and WalkTables return, in one walk.
func WalkBoth(mem vasmon.Memory, p WalkParams) (Map, []Table, error) {
	out := make(Map)
	var ts []Table
	mon := p.Monitored | vasmon.BitP
	err := walk(mem, p, func(va, size, e uint64) { out[Key{va, size}] = e & mon }, func(t Table) { ts = append(ts, t) })
	if err != nil {
		return nil, nil, err
	}
	return out, ts, nil
}

// TablePages returns the set of pages (page-aligned GPAs) holding the tables
// a full walk reaches: the pages a monitor must write-protect.
func TablePages(mem vasmon.Memory, ps ...WalkParams) (map[uint64]bool, error) {
	pages := make(map[uint64]bool)
	for _, p := range ps {
		ts, err := WalkTables(mem, p)
		if err != nil {
			return nil, err
		}
		for _, t := range ts {
			pages[t.GPA&^(vasmon.PageSize-1)] = true
		}
	}
	return pages, nil
}

// walk is the reference walker: it calls leaf for every present leaf in
// scope and table for every table it enters (either may be nil).
func walk(mem vasmon.Memory, p WalkParams, leaf func(va, size, e uint64), table func(Table)) error {
	mode := p.Mode
	root := mode.RootGPA(p.CR3)
	top := mode.Levels()
	if !mem.InRAM(root, uint64(mode.TableBytes(top))) {
		return fmt.Errorf("vasmontest: root %#x outside RAM", root)
	}
	var rec func(gpa uint64, level int, base uint64, path []uint64) error
	rec = func(gpa uint64, level int, base uint64, path []uint64) error {
		if table != nil {
			table(Table{Level: level, GPA: gpa, VA: base})
		}
		n := mode.Entries(level)
		if level == top && !p.Opts.FullSpace {
			n = mode.UserEntries()
		}
		esz := mode.EntryBytes()
		buf := make([]byte, n*esz)
		if err := mem.Read(gpa, buf); err != nil {
			return err
		}
		for i := 0; i < n; i++ {
			var e uint64
			if esz == 4 {
				e = uint64(binary.LittleEndian.Uint32(buf[i*4:]))
			} else {
				e = binary.LittleEndian.Uint64(buf[i*8:])
			}
			va := mode.Canonical(base | uint64(i)<<mode.Shift(level))
			switch mode.Classify(e, level) {
			case vasmon.KindLeaf:
				if va == 0 && p.Opts.IgnoreNullPage {
					continue
				}
				if leaf != nil {
					leaf(va, mode.EntrySpan(level), e)
				}
			case vasmon.KindTable:
				child := mode.TableAddr(e)
				if !mem.InRAM(child, uint64(mode.TableBytes(level-1))) || child/vasmon.PageSize >= 1<<32-1 {
					continue
				}
				self := false
				for _, a := range path {
					if a == child/vasmon.PageSize {
						self = true
					}
				}
				if self || child/vasmon.PageSize == gpa/vasmon.PageSize {
					continue
				}
				np := append([]uint64{gpa / vasmon.PageSize}, path...)
				if err := rec(child, level-1, va, np); err != nil {
					return err
				}
			}
		}
		return nil
	}
	return rec(root, top, 0, nil)
}

// WalkRoot walks a monitored root.
func WalkRoot(mem vasmon.Memory, r *vasmon.Root) (Map, error) { return Walk(mem, ParamsOf(r)) }

// Event is one recorded callback.
type Event struct {
	VA, Old, New, Size uint64
}

func (e Event) String() string {
	return fmt.Sprintf("va=%#x old=%#x new=%#x size=%#x", e.VA, e.Old, e.New, e.Size)
}

// Apply applies callbacks, in order, to m (SEMANTICS.md section 6): if New is
// a present leaf at the level of Size, the map holds VA -> New & monitored;
// otherwise the mapping at VA of that size is removed.
func Apply(m Map, mode vasmon.Mode, monitored uint64, evs []Event) {
	mon := monitored | vasmon.BitP
	for _, e := range evs {
		k := Key{e.VA, e.Size}
		if mode.Classify(e.New, LevelOf(mode, e.Size)) == vasmon.KindLeaf {
			m[k] = e.New & mon
		} else {
			delete(m, k)
		}
	}
}

// LevelOf returns the level whose entries span size bytes (0 if none).
func LevelOf(mode vasmon.Mode, size uint64) int {
	for l := 1; l <= mode.Levels(); l++ {
		if mode.EntrySpan(l) == size {
			return l
		}
	}
	return 0
}

// Clone copies a map.
func (m Map) Clone() Map {
	c := make(Map, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

// Diff describes how got differs from want, or returns "" if they are equal.
// At most limit differences are listed.
func Diff(want, got Map, limit int) string {
	var lines []string
	for k, v := range want {
		if g, ok := got[k]; !ok {
			lines = append(lines, fmt.Sprintf("missing va=%#x size=%#x want=%#x", k.VA, k.Size, v))
		} else if g != v {
			lines = append(lines, fmt.Sprintf("differs va=%#x size=%#x want=%#x got=%#x", k.VA, k.Size, v, g))
		}
	}
	for k, v := range got {
		if _, ok := want[k]; !ok {
			lines = append(lines, fmt.Sprintf("extra   va=%#x size=%#x got=%#x", k.VA, k.Size, v))
		}
	}
	if len(lines) == 0 {
		return ""
	}
	sort.Strings(lines)
	n := len(lines)
	if n > limit {
		lines = append(lines[:limit], fmt.Sprintf("... and %d more", n-limit))
	}
	return fmt.Sprintf("%d differences:\n  %s", n, strings.Join(lines, "\n  "))
}

// Recorder collects callbacks per root context; it is safe for concurrent use.
type Recorder struct {
	mu  sync.Mutex
	evs map[any][]Event
}

// NewRecorder returns an empty recorder.
func NewRecorder() *Recorder { return &Recorder{evs: make(map[any][]Event)} }

// Callback records callback(ctx, ...) under ctx.
func (r *Recorder) Callback(ctx any, va, old, new, size uint64) {
	r.mu.Lock()
	r.evs[ctx] = append(r.evs[ctx], Event{va, old, new, size})
	r.mu.Unlock()
}

// Take returns and forgets the events recorded under ctx.
func (r *Recorder) Take(ctx any) []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.evs[ctx]
	delete(r.evs, ctx)
	return e
}

// Peek returns a copy of the events recorded under ctx.
func (r *Recorder) Peek(ctx any) []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Event(nil), r.evs[ctx]...)
}
