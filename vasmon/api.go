package vasmon

import (
	"errors"
	"sync/atomic"

	"github.com/vasengine/vasengine/guestmem"
)

// VMID names a guest VM. IDs are chosen by the caller and unique per monitor.
type VMID uint32

// Memory is the guest-physical memory of one VM as the monitor reads it.
// Implementations must be safe for concurrent use by several goroutines (the
// sharded engine reads different tables from different workers).
type Memory interface {
	// Read copies len(dst) bytes of guest memory at gpa into dst. It fails
	// if any byte lies outside guest RAM.
	Read(gpa uint64, dst []byte) error
	// InRAM reports whether [gpa, gpa+n) lies inside guest RAM.
	InRAM(gpa, n uint64) bool
}

// Versioned is implemented by a Memory whose backend keeps the version word
// of every guest page (guestmem.Versions): it counts, per page, the trapped
// writes and the protection changes, and it stamps each trapped write's
// event with its count (Write.Ver). With it the monitor proves every read of
// guest memory and every reported entry against concurrent guest writes
// (see the package documentation, "No phantoms"); without it the monitor
// assumes it is called synchronously, with guest memory as the events left
// it.
type Versioned interface {
	Versions() *guestmem.Versions
}

// Protector write-protects guest pages, as an EPT write hook does. The monitor
// reference-counts: it calls Protect once when a page becomes a table of any
// monitored root and Unprotect once when its last table is unhooked. Calls
// for different pages may come concurrently from different goroutines.
type Protector interface {
	Protect(gpa uint64) error
	Unprotect(gpa uint64) error
}

// Write is one trapped guest write to a page-table page.
type Write struct {
	GPA  uint64 // address of the first byte written
	Data uint64 // the bytes written, little-endian, low Size bytes
	Old  uint64 // value of the whole entry holding GPA before the write, if HasOld
	RIP  uint64 // instruction pointer of the writer; 0 if unknown
	// Trap is when the write was trapped, on any monotonic clock of
	// nanoseconds shared by the writes of one monitor (0: unknown). It
	// orders nothing; it only ends partial writes left pending for longer
	// than the store's PendingTimeout (SEMANTICS.md section 3).
	Trap int64
	// Ver is the write's stamp on its page's version word
	// (guestmem.Versions.BeginWrite), and Ver2 the stamp on the next
	// page's for a write that crosses into it. A write whose stamp is not
	// after the count at which the store last read its page is in that
	// read and is dropped as stale. With versioned memory a part without a
	// stamp (0) did not trap on its page (the page was not protected), so
	// it is older than any read of the page and is dropped too; without
	// versions stamps are ignored.
	Ver, Ver2 uint32
	Size      uint8 // 1..8
	// HasOld says Old was read by the backend from guest memory just
	// before the write. Otherwise the monitor's shadow value is used.
	HasOld bool
	// Held, if later than Trap, is when the write's vCPU was released
	// after it (a synchronous write: the vCPU is held until the monitor
	// has processed it), on Trap's clock. A partial write it starts is
	// timed from Held: the guest could not write the entry's other half
	// earlier, so the time it was held must not count against it
	// (SEMANTICS.md sections 3 and 7).
	Held int64
	// Stamped says every stamp of the write was taken by BeginWrite
	// before the store reached memory (not by Versions.Trap after it): the
	// store then came after every load of its page's word that saw a
	// count below the stamp. The store uses that order to prove a value
	// from the write itself, without reading guest memory again (see
	// proof.go); without it (false) values are proven by reading guest
	// memory, which is always sound.
	Stamped bool
}

// Callback is invoked when a leaf mapping of a root changes in any monitored
// bit: va is the first address of the mapping, old and new are the entries
// at the same level (either may be non-present, or new a table entry when a
// large page is split), size is the page size of that level.
type Callback func(ctx any, va, old, new, size uint64)

// Options are per-root monitoring options. The zero value is the default:
// user half only, pre-filled linked tables reported, the global table budget.
type Options struct {
	// FullSpace monitors the kernel half too. Entries that point back to
	// their own table or an ancestor's (a self-map) are never descended into.
	FullSpace bool
	// IgnoreNullPage suppresses callbacks for mappings at virtual address 0
	// (HVMI's Linux option).
	IgnoreNullPage bool
	// HVMICompat hooks newly linked, already populated tables silently, as
	// HVMI does, instead of reporting each present leaf as a new mapping.
	// The callback stream then no longer satisfies the oracle.
	HVMICompat bool
	// MaxTables is the root's table budget; 0 means DefaultRootTables.
	MaxTables int64
}

// Default budgets. A hooked table costs about 4.2 KB of host memory, so the
// defaults bound one root to ~275 MB and one VM to ~1.1 GB.
const (
	DefaultRootTables = 1 << 16
	DefaultVMTables   = 1 << 18
)

// Errors returned by the monitor.
var (
	ErrUnknownVM   = errors.New("vasmon: unknown VM")
	ErrVMExists    = errors.New("vasmon: VM already added")
	ErrUnknownRoot = errors.New("vasmon: root is not monitored")
	ErrRootExists  = errors.New("vasmon: CR3 already monitored")
	ErrBadMode     = errors.New("vasmon: invalid paging mode")
	ErrRootOutside = errors.New("vasmon: root table lies outside guest RAM")
	ErrBudget      = errors.New("vasmon: table budget exhausted")
	ErrBadWrite    = errors.New("vasmon: write size must be 1..8")
	ErrNilCallback = errors.New("vasmon: nil callback")
)

// VM is a registered guest: its memory, its write protection and its table
// budget. Counters are atomic: the sharded engine updates them from several
// workers.
type VM struct {
	ID VMID
	// Key is the VM's key in a store's index of pages: ID, unless the
	// executor chose another (the engine uses its counter slot, which its
	// events carry).
	Key       VMID
	Mem       Memory
	Prot      Protector
	MaxTables int64
	// Slot is the executor's own index for the VM (the engine's counter
	// slot); the monitor does not use it.
	Slot uint32

	tables   atomic.Int64
	refused  atomic.Int64
	admitted atomic.Int64 // hook requests emitted by steps and not yet run (Store.emitHook)
	flooded  atomic.Int64 // pages flooded now (polled, not trapped)
	vers     *guestmem.Versions
}

// NewVM returns a VM record; maxTables 0 means DefaultVMTables.
func NewVM(id VMID, mem Memory, prot Protector, maxTables int64) *VM {
	if maxTables <= 0 {
		maxTables = DefaultVMTables
	}
	v := &VM{ID: id, Key: id, Mem: mem, Prot: prot, MaxTables: maxTables}
	if vm, ok := mem.(Versioned); ok {
		v.vers = vm.Versions()
	}
	return v
}

// Tables returns the number of tables hooked for the VM's roots.
func (v *VM) Tables() int64 { return v.tables.Load() }

// Flooded returns how many of the VM's pages are flooded now: written so
// often that they are read now and then instead of trapped (flood.go).
func (v *VM) Flooded() int64 { return v.flooded.Load() }

// Refused returns how many table hooks the VM's budget refused.
func (v *VM) Refused() int64 { return v.refused.Load() }

// Root is one monitored guest virtual address space. Its exported fields are
// fixed at start; its counters may be read at any time.
type Root struct {
	VM        *VM
	CR3       uint64
	Mode      Mode
	Monitored uint64 // MonitoredBits | P
	Callback  Callback
	Ctx       any
	Opts      Options
	ID        uint32
	// Exec is the executor's own per-root state (the sharded engine's
	// in-flight accounting); the monitor never uses it.
	Exec any

	tables   atomic.Int64
	gen      atomic.Uint32
	stopped  atomic.Bool
	stats    rootCounters
	admitted atomic.Int64 // hook requests emitted by steps and not yet run (Store.emitHook)
}

type rootCounters struct {
	refused, outOfRAM, selfRef, reserved, outOfScope atomic.Int64
	lastRefusedGPA, lastRefusedVA                    atomic.Uint64
	lastRefusedLevel                                 atomic.Int32
}

// NewRoot returns a root record. It validates the arguments but hooks
// nothing: Monitor.Start and the engine do that.
func NewRoot(id uint32, vm *VM, cr3 uint64, mode Mode, monitored uint64, cb Callback, ctx any, opts Options) (*Root, error) {
	if !mode.valid() {
		return nil, ErrBadMode
	}
	if cb == nil {
		return nil, ErrNilCallback
	}
	if opts.MaxTables <= 0 {
		opts.MaxTables = DefaultRootTables
	}
	if mode.EntryBytes() == 4 {
		monitored &= 0xFFFFFFFF
	}
	return &Root{VM: vm, CR3: cr3, Mode: mode, Monitored: monitored | BitP, Callback: cb, Ctx: ctx, Opts: opts, ID: id}, nil
}

// RootGPA returns the guest-physical address of the root table.
func (r *Root) RootGPA() uint64 { return r.Mode.RootGPA(r.CR3) }

// Tables returns the number of tables currently hooked for the root.
func (r *Root) Tables() int64 { return r.tables.Load() }

// Stopped reports whether the root has been stopped.
func (r *Root) Stopped() bool { return r.stopped.Load() }

// MarkStopped marks the root stopped; writes to its tables are then ignored.
func (r *Root) MarkStopped() { r.stopped.Store(true) }

// RootStats are a root's counters of skipped or refused work.
type RootStats struct {
	Tables     int64 // tables hooked now
	Refused    int64 // table hooks refused by the root or VM budget
	OutOfRAM   int64 // table entries pointing outside guest RAM, not hooked
	SelfRef    int64 // table entries pointing to their own table or an ancestor's
	Reserved   int64 // entries with PS at a level where it is reserved
	OutOfScope int64 // writes to kernel-half root entries (user-half roots)
	// The most recent refusal: the table that was not hooked.
	LastRefusedGPA   uint64
	LastRefusedVA    uint64
	LastRefusedLevel int
}

// Stats returns a snapshot of the root's counters.
func (r *Root) Stats() RootStats {
	s := &r.stats
	return RootStats{
		Tables: r.tables.Load(), Refused: s.refused.Load(), OutOfRAM: s.outOfRAM.Load(),
		SelfRef: s.selfRef.Load(), Reserved: s.reserved.Load(), OutOfScope: s.outOfScope.Load(),
		LastRefusedGPA: s.lastRefusedGPA.Load(), LastRefusedVA: s.lastRefusedVA.Load(),
		LastRefusedLevel: int(s.lastRefusedLevel.Load()),
	}
}
