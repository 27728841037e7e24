package vasmon

import (
	"fmt"
	"sort"
)

// Monitor is the single-threaded VAS monitor: one Store, and a loop that
// executes the structural requests of each step at once, in FIFO order. It
// is not safe for concurrent use, and callbacks must not call back into it
// (they run after the requests of the write, Start or Stop that produced
// them, or after every maxCalls of them; a re-entrant call returns
// ErrReentrant).
type Monitor struct {
	store  *Store
	vms    map[VMID]*VM
	roots  map[rootKey]*Root
	out    Output
	nextID uint32
	busy   bool
}

type rootKey struct {
	vm  VMID
	cr3 uint64
}

// ErrReentrant is returned when a callback calls into its own Monitor.
var ErrReentrant = fmt.Errorf("vasmon: monitor called from its own callback")

// NewMonitor returns an empty monitor.
func NewMonitor() *Monitor {
	return &Monitor{store: NewStore(), vms: make(map[VMID]*VM), roots: make(map[rootKey]*Root)}
}

// Store returns the monitor's store (for statistics and memory figures).
func (m *Monitor) Store() *Store { return m.store }

// AddVM registers a guest. maxTables is the VM's table budget (0: default).
func (m *Monitor) AddVM(id VMID, mem Memory, prot Protector, maxTables int64) error {
	if m.busy {
		return ErrReentrant
	}
	if _, ok := m.vms[id]; ok {
		return ErrVMExists
	}
	if mem == nil || prot == nil {
		return fmt.Errorf("vasmon: VM %d needs a memory and a protector", id)
	}
	m.vms[id] = NewVM(id, mem, prot, maxTables)
	return nil
}

// VM returns the VM record of id, or nil.
func (m *Monitor) VM(id VMID) *VM { return m.vms[id] }

// RemoveVM stops every root of the VM (reporting their mappings as removed)
// and forgets it.
func (m *Monitor) RemoveVM(id VMID) error {
	if m.busy {
		return ErrReentrant
	}
	if _, ok := m.vms[id]; !ok {
		return ErrUnknownVM
	}
	for _, r := range m.sortedRoots() {
		if r.VM.ID == id {
			if err := m.Stop(r); err != nil {
				return err
			}
		}
	}
	delete(m.vms, id)
	return nil
}

func (m *Monitor) sortedRoots() []*Root {
	rs := make([]*Root, 0, len(m.roots))
	for _, r := range m.roots {
		rs = append(rs, r)
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].ID < rs[j].ID })
	return rs
}

// Start monitors the address space (vm, cr3) in the given paging mode: it
// hooks every table reachable in scope and reports no callback for the
// mappings that already exist. monitored is the set of entry bits whose
// change is reported (P is always included).
func (m *Monitor) Start(vm VMID, cr3 uint64, mode Mode, monitored uint64, cb Callback, ctx any, opts Options) (*Root, error) {
	if m.busy {
		return nil, ErrReentrant
	}
	v := m.vms[vm]
	if v == nil {
		return nil, ErrUnknownVM
	}
	if _, ok := m.roots[rootKey{vm, cr3}]; ok {
		return nil, ErrRootExists
	}
	m.nextID++
	r, err := NewRoot(m.nextID, v, cr3, mode, monitored, cb, ctx, opts)
	if err != nil {
		return nil, err
	}
	gpa := r.RootGPA()
	if !v.Mem.InRAM(gpa, uint64(mode.TableBytes(mode.Levels()))) {
		return nil, fmt.Errorf("%w: CR3 %#x", ErrRootOutside, cr3)
	}
	m.out.Reset()
	req := Request{Root: r, GPA: gpa, Level: uint8(mode.Levels()), Op: OpHook}
	switch m.store.Hook(&req, &m.out) {
	case Refused:
		return nil, fmt.Errorf("%w: root %#x of VM %d", ErrBudget, cr3, vm)
	case Failed:
		return nil, fmt.Errorf("vasmon: cannot read or protect the root table at %#x of VM %d", gpa, vm)
	}
	m.roots[rootKey{vm, cr3}] = r
	m.run()
	return r, nil
}

// Stop stops monitoring r: every table is unhooked and every present leaf
// reported as removed, callback(va, old, 0, size).
func (m *Monitor) Stop(r *Root) error {
	if m.busy {
		return ErrReentrant
	}
	if r == nil || m.roots[rootKey{r.VM.ID, r.CR3}] != r {
		return ErrUnknownRoot
	}
	m.out.Reset()
	req := Request{Root: r, GPA: r.RootGPA(), Level: uint8(r.Mode.Levels()), Op: OpUnhook}
	m.store.Unhook(&req, &m.out)
	m.run()
	r.MarkStopped()
	delete(m.roots, rootKey{r.VM.ID, r.CR3})
	return nil
}

// StopCR3 stops the root (vm, cr3).
func (m *Monitor) StopCR3(vm VMID, cr3 uint64) error {
	if m.busy {
		return ErrReentrant
	}
	r := m.roots[rootKey{vm, cr3}]
	if r == nil {
		return ErrUnknownRoot
	}
	return m.Stop(r)
}

// Root returns the monitored root (vm, cr3), or nil.
func (m *Monitor) Root(vm VMID, cr3 uint64) *Root { return m.roots[rootKey{vm, cr3}] }

// Write processes one trapped write of VM vm and invokes the callbacks it
// produces, in order.
func (m *Monitor) Write(vm VMID, w Write) (WriteKind, error) {
	if m.busy {
		return 0, ErrReentrant
	}
	if w.Size == 0 || w.Size > 8 {
		return 0, ErrBadWrite
	}
	m.out.Reset()
	k := m.store.Write(vm, &w, &m.out)
	m.run()
	return k, nil
}

// maxCalls is how many callbacks run buffers before invoking them.
const maxCalls = 4096

// run executes every pending request, FIFO, then invokes the callbacks
// (every maxCalls of them, as they accumulate, and the rest at the end).
// FIFO order makes an unlink's unhooks run before the hooks of a link made
// by the same write, level by level.
//
// The queue is kept in proportion to the table budgets, not to what the
// guest claims (an alias bomb makes every hooked table link 512 more):
// admit drops, as they are appended, the hooks the budget would refuse and
// the unhooks of tables that are not hooked; and callbacks are invoked, in
// order, whenever maxCalls are buffered (a budget's worth of level-1 tables
// unlinked at once reports up to 512 times the budget).
func (m *Monitor) run() {
	m.admit(0)
	for i := 0; i < len(m.out.Reqs); i++ {
		req := m.out.Reqs[i]
		r := req.Root
		if req.Op == OpHook {
			r.queued--
			r.VM.queued--
			if !m.store.Linked(&req) {
				Dropped(&req)
				// Its parent was unhooked after linking it (one write
				// completed both the parent's unlink and this link).
				continue
			}
		} else {
			r.queued++
			r.VM.queued++
		}
		n := len(m.out.Reqs)
		m.store.Exec(&req, &m.out)
		m.admit(n)
		if len(m.out.Calls) >= maxCalls {
			m.callbacks()
		}
	}
	m.callbacks()
}

// admit filters the requests appended from index from. A hook is refused
// (and counted, as Store.Hook would) when the tables hooked plus the hooks
// queued minus the unhooks queued reach the root's or the VM's budget: the
// refusal Store.Hook would make when the hook ran, unless a request ahead
// of it fails or is dropped (then the hook is refused a little early, at
// the edge of the budget only). An unhook of a table that is not hooked
// would miss; it is dropped (and counted) now. A table hooked later in the
// same run is never unhooked in it: unhooks of a place always come before
// the hooks of that place, and a hook whose parent went is dropped.
func (m *Monitor) admit(from int) {
	reqs := m.out.Reqs
	k := from
	// Refusals come in runs (a table's links past the budget): count a
	// run at once.
	var refused int64
	var last Request
	for i := from; i < len(reqs); i++ {
		req := &reqs[i]
		r := req.Root
		vm := r.VM
		if refused > 0 && r != last.Root {
			last.Root.refuseN(refused, &last)
			refused = 0
		}
		if req.Op == OpHook {
			if r.tables.Load()+r.queued >= r.Opts.MaxTables || vm.tables.Load()+vm.queued >= vm.MaxTables {
				Dropped(req)
				refused++
				last = *req
				continue
			}
			r.queued++
			vm.queued++
		} else {
			if m.store.unhookTarget(req) == 0 {
				m.store.st.UnhookMisses++
				continue
			}
			r.queued--
			vm.queued--
		}
		reqs[k] = *req
		k++
	}
	if refused > 0 {
		last.Root.refuseN(refused, &last)
	}
	m.out.Reqs = reqs[:k]
}

// callbacks invokes the buffered callbacks, in order, and empties the buffer.
func (m *Monitor) callbacks() {
	m.busy = true
	defer func() { m.busy = false }()
	for i := range m.out.Calls {
		c := &m.out.Calls[i]
		c.Root.Callback(c.Root.Ctx, c.VA, c.Old, c.New, c.Size)
	}
	m.out.Calls = m.out.Calls[:0]
}

// TableInfo describes one hooked table, as Dump returns it.
type TableInfo struct {
	Level   int
	GPA     uint64
	VA      uint64 // first VA mapped through the table
	Entries int    // entries in the table (in scope)
	Present int    // present entries in scope
	Writes  uint64 // writes seen on the table's page
	Stale   bool
}

// Dump returns the tables of r, highest level first, then by VA.
func (m *Monitor) Dump(r *Root) []TableInfo { return m.store.Dump(r, nil) }

// Dump appends the tables of r held by this store to dst and sorts them.
func (s *Store) Dump(r *Root, dst []TableInfo) []TableInfo {
	for h := uint32(1); h < s.nodes.next; h++ {
		n := s.nodes.at(h)
		if n.root != r {
			continue
		}
		p := s.pages.at(n.page)
		ti := TableInfo{Level: int(n.level), GPA: p.pfn*PageSize + uint64(n.off), VA: n.va,
			Entries: scope(n), Writes: uint64(p.writes), Stale: n.stale}
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
