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
	retry  []Request // hooks given up for now (Unsure)
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
	res := m.store.Hook(&req, &m.out)
	for try := 1; res == Unsure && try < proofTries; try++ {
		res = m.store.Hook(&req, &m.out)
	}
	switch res {
	case Refused:
		return nil, fmt.Errorf("%w: root %#x of VM %d", ErrBudget, cr3, vm)
	case Hooked:
	default:
		m.run()
		return nil, fmt.Errorf("vasmon: cannot read or protect the root table at %#x of VM %d (%v)", gpa, vm, res)
	}
	m.roots[rootKey{vm, cr3}] = r
	m.run()
	return r, nil
}

// Stop stops monitoring r: the partial writes of r's tables end
// (Store.FlushRoot; other roots' go on), then every table is unhooked and
// every present leaf reported as removed, callback(va, old, 0, size).
func (m *Monitor) Stop(r *Root) error {
	if m.busy {
		return ErrReentrant
	}
	if r == nil || m.roots[rootKey{r.VM.ID, r.CR3}] != r {
		return ErrUnknownRoot
	}
	// Partial writes end first, while the tree still proves them.
	m.out.Reset()
	m.store.FlushRoot(r, &m.out)
	m.run()
	m.out.Reset()
	r.MarkStopped() // hooks of the root given up for now are dropped
	req := Request{Root: r, GPA: r.RootGPA(), Level: uint8(r.Mode.Levels()), Op: OpUnhook}
	m.store.Unhook(&req, &m.out)
	m.run()
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
// by the same write, level by level. A hook whose parent was unhooked (or
// re-pointed) after emitting it is dropped. The queue stays in proportion
// to the table budgets: hooks are admitted against them as they are
// emitted, and unhooks are emitted only for admitted links.
func (m *Monitor) run() {
	for i := 0; i < len(m.out.Reqs); i++ {
		req := m.out.Reqs[i]
		if req.Op == OpHook && !m.store.Linked(&req) {
			Dropped(&req)
			continue
		}
		if m.store.Exec(&req, &m.out) == Unsure {
			m.retry = append(m.retry, req)
		}
		if len(m.out.Calls) >= maxCalls {
			m.callbacks()
		}
	}
	m.out.Reqs = m.out.Reqs[:0]
	m.callbacks()
	m.out.Trim()
}

// Flush brings the monitor to a quiescent point (SEMANTICS.md sections 3
// and 6): every partial write ends with the bytes it has, every page whose
// read was given up is read again, every hook given up is run again, and
// the callbacks all that produces are invoked. It returns an error if guest
// memory kept changing under some read (the work stays queued for the next
// Flush).
func (m *Monitor) Flush() error {
	if m.busy {
		return ErrReentrant
	}
	for try := 0; try < proofTries; try++ {
		m.out.Reset()
		m.store.Flush(&m.out)
		m.out.Reqs = append(m.out.Reqs, m.retry...)
		m.retry = m.retry[:0]
		m.run()
		if len(m.retry) == 0 && m.store.Dirty() == 0 {
			return nil
		}
	}
	return fmt.Errorf("vasmon: guest memory kept changing under %d reads", len(m.retry)+m.store.Dirty())
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

// Dump flushes the monitor (partial writes end) and returns the tables of
// r, highest level first, then by VA.
func (m *Monitor) Dump(r *Root) []TableInfo {
	_ = m.Flush()
	return m.store.Dump(r, nil)
}
