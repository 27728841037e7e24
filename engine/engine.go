// Package engine monitors the page tables of many VMs on one host with a set
// of shards (package shard), each owning the table nodes of the guest pages
// hashed to it.
//
// # Contract
//
// Routing: the page at guest-physical address gpa of a VM belongs to shard
// xxhash(slot, gpa/4096) mod N (the hash's high 32 bits, by multiply-shift),
// where slot is the VM's counter slot, for the VM's lifetime. A store that
// crosses a page boundary is split per page, and each part is processed by
// the shard that owns its page (SEMANTICS.md section 3).
//
// Concurrency: every method is safe for concurrent use. Submit may be called
// from many producer goroutines (backend vCPU threads) at once.
//
// Execution: a shard's state is owned by whoever holds its ownership token:
// its worker goroutine (one per shard, pinned to a CPU when Config asks
// for it), an idle worker of another shard when the shard's own worker is
// parked, or a synchronous submitter waiting for its write (Syncer). With
// Config.Driver no worker runs at all: a deterministic scheduler (package
// explore) steps the shards and every wait of the engine yields to it.
//
// Ordering: events that write the same page-table entry are applied in the
// order their Submit calls were made (a backend that lets two vCPUs write one
// entry must serialize those submissions, as it serializes the stores). Hook
// and unhook messages from one shard to another are applied in the order
// they were sent, and an unlinked subtree's removals are reported before a
// newly linked subtree's additions at the same addresses. Nothing else
// orders events of different pages across shards; what a callback reports
// is nevertheless always true at some instant (SEMANTICS.md section 6, "No
// phantoms": package vasmon proves every value and every read against
// versioned guest memory), and after Sync every root satisfies the oracle.
//
// Callbacks: a root's callbacks run on the goroutine that steps the shard
// owning the table (see Execution), so callbacks of one root may run
// concurrently. RootOptions.SerializeCallbacks runs them one at a time. A
// callback must not block for long: it delays its shard. A callback must not
// call back into the engine's waiting methods (Sync, Close, Stop, RemoveVM,
// Dump, a blocking Submit into a full queue, Syncer.Submit): they return
// ErrReentrant. A panicking callback is recovered, counted, reported to
// Config.OnPanic with its root, and the shard keeps running.
//
// Latency: each callback's trap-to-callback latency (from Event.Trap) is
// recorded and held against Config.Budget. It is never under-stated: fast
// callbacks are timed in groups of up to 16 by one clock read after them
// (over-stating each by at most its group's duration, a few microseconds),
// slow ones (over 0.5 us each) one by one as they start (see package shard).
//
// Backpressure: a blocking Submit that finds a queue full yields a few
// times, then waits until the worker has drained the queue to half.
//
// Allocation: Submit copies events into the shards' queues and allocates
// nothing; shards allocate nothing in steady state (see the tests).
//
// Accounting: every submitted event (each part of a store split at a page
// boundary counts as one) is either processed or rejected with an error
// (Stats: Submitted == Processed + Rejected once Sync or Close returns).
package engine

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/puzpuzpuz/xsync/v3"
	"golang.org/x/sys/unix"

	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// Config configures an engine. The zero value is valid: one shard per CPU
// the process may use, unpinned, blocking submits, a 20 us latency budget.
type Config struct {
	Shards int   // number of shards; 0: one per allowed CPU
	CPUs   []int // host CPUs to pin shards to, round robin; nil: the allowed set
	// Pin pins each worker to a CPU of CPUs. Pinning pays only on cores
	// reserved for the engine: a pinned worker sharing its core with busy
	// threads cannot move to an idle one.
	Pin        bool
	NoPin      bool          // deprecated: workers are unpinned unless Pin
	QueueDepth int           // events per shard queue; 0: 16384
	MaxBatch   int           // events drained per batch; 0: 256
	Budget     time.Duration // trap-to-callback latency budget; 0: 20 us
	// NonBlocking makes Submit return ErrOverload instead of waiting when
	// a queue is full, or when the VM has more than its share of a queue
	// (its part of half the queue, split among the VMs) and the queue is
	// half full: fair ingest, so that one VM's flood never makes another
	// VM within its share wait or be refused.
	NonBlocking bool
	MaxVMs      int // VMs registered at once, at most 65535; 0: 1024
	MaxVMLabels int // VMs with their own metric label; the rest are "other"; 0: 32
	// Spin is how long an idle worker polls its queue before it parks; 0:
	// 50 us, negative: park at once. Waking a parked worker costs the
	// operating system's thread wake-up (20-80 us measured on the project's
	// machine, more than the default budget), so an engine held to a
	// budget of tens of microseconds at a steady event rate should poll
	// longer than the gaps between events, at the price of a busy CPU.
	Spin time.Duration
	// PendingTimeout ends a partial write whose first chunk was trapped
	// this long before a later event of its shard; 0: 1 ms.
	PendingTimeout time.Duration
	// Flood is the write-flood policy of the shards' stores: a page of
	// level-1 tables written faster than a threshold is read now and then
	// instead of trapped (vasmon.FloodPolicy; the zero value is the
	// default, Writes < 0 turns it off).
	Flood vasmon.FloodPolicy
	// OnPanic is told of each recovered callback panic; nil logs nothing.
	OnPanic func(root *vasmon.Root, v any)
	// Driver, if set, runs the engine deterministically: no worker
	// goroutine is started; the driver steps the shards, and every wait of
	// the engine calls Driver.Wait (package explore).
	Driver Driver
}

// Driver is a deterministic scheduler of an engine (package explore).
type Driver interface {
	// Wait is called by an engine method that waits for progress; the
	// driver makes some (steps shards, runs other actors) and returns.
	Wait()
}

// Errors.
var (
	ErrOverload   = errors.New("engine: shard queue full (non-blocking mode)")
	ErrClosed     = errors.New("engine: closed")
	ErrTooMany    = errors.New("engine: too many VMs")
	ErrReentrant  = errors.New("engine: called from a callback (a shard's own thread)")
	ErrSlotBusy   = errors.New("engine: every free VM slot still has events of a removed VM queued")
	ErrBadSubmits = errors.New("engine: event of size 0 or more than 8 bytes")
)

// RootOptions are per-root options: vasmon's, plus the engine's own.
type RootOptions struct {
	vasmon.Options
	// SerializeCallbacks runs the root's callbacks one at a time even when
	// its tables live on different shards.
	SerializeCallbacks bool
	// Verdict, if set, is called instead of the callback: its answer
	// refuses a synchronous write (Syncer.Submit returns shard.Deny).
	Verdict shard.VerdictCallback
	// Traced, if set (and Verdict not), is called instead of the callback,
	// with the trap time of the write that caused each change
	// (shard.TracedCallback).
	Traced shard.TracedCallback
}

type rootKey struct {
	vm  vasmon.VMID
	cr3 uint64
}

type vmEntry struct {
	vm        *vasmon.VM
	slot      uint16
	submitted atomic.Uint64 // events (parts)
	rejected  atomic.Uint64
	roots     atomic.Int64
	removed   bool // guarded by Engine.slotMu
}

// Engine is a running set of shards. Create it with New, release it with Close.
type Engine struct {
	cfg    Config
	shards []*shard.Shard
	vms    *xsync.MapOf[vasmon.VMID, *vmEntry]
	roots  *xsync.MapOf[rootKey, *vasmon.Root]
	nextID atomic.Uint32

	slotMu sync.Mutex
	// owner[i] is the VM that last used counter slot i (nil: never used);
	// freed[i] orders free slots by when they were freed (0: in use).
	// A removed VM's counters stay readable until its slot is reused,
	// which happens to the longest-free drained slot first.
	owner   []*vmEntry
	freed   []uint64
	frees   uint64
	slotGen []atomic.Uint32
	epoch   atomic.Uint64
	gone    goneCounts // counts of VMs whose slot was reused

	tmu     sync.Mutex
	tickets []*shard.Ticket // by handle; 0 unused
	tfree   []uint16

	share                         atomic.Int32     // a VM's share of a shard queue (fair ingest)
	stall                         shard.Histogram  // synchronous writes: trap to return (Syncer.Submit)
	verdicts                      [2]atomic.Uint64 // synchronous writes by verdict
	submitted, accepted, rejected atomic.Uint64
	active                        atomic.Int64
	closed                        atomic.Bool
	closeOnce                     sync.Once
	stopped                       chan struct{} // closed once Close has stopped the workers
	panicRoots                    *xsync.MapOf[uint32, *atomic.Uint64]
	refusedGone                   atomic.Int64 // hook refusals of removed VMs
	waiters                       *xsync.MapOf[uint32, chan struct{}]
}

// goneCounts are the event counts of unlabeled VMs (see Register) whose
// slot was reused, so the "other" series never go backwards.
type goneCounts struct {
	submitted, rejected uint64
	kinds               [5]uint64
	callbacks, over     uint64
}

// New starts an engine. Pinning failures do not fail New: they are returned
// by PinErrors and the affected workers run unpinned.
func New(cfg Config) (*Engine, error) {
	allowed, err := shard.AllowedCPUs()
	if err != nil || len(allowed) == 0 {
		allowed = make([]int, runtime.NumCPU())
		for i := range allowed {
			allowed[i] = i
		}
	}
	if cfg.Shards < 0 {
		return nil, fmt.Errorf("engine: %d shards: must be at least 1", cfg.Shards)
	}
	if cfg.Shards == 0 {
		cfg.Shards = len(allowed)
	}
	if cfg.Shards > maxShards {
		return nil, fmt.Errorf("engine: %d shards: at most %d", cfg.Shards, maxShards)
	}
	if cfg.CPUs == nil {
		cfg.CPUs = allowed
	}
	in := make(map[int]bool, len(allowed))
	for _, c := range allowed {
		in[c] = true
	}
	for _, c := range cfg.CPUs {
		if !in[c] {
			return nil, fmt.Errorf("engine: CPU %d is not in the set this process may use (%v)", c, allowed)
		}
	}
	if len(cfg.CPUs) == 0 {
		return nil, fmt.Errorf("engine: empty CPU list")
	}
	if cfg.Budget < 0 {
		return nil, fmt.Errorf("engine: latency budget %v must be positive", cfg.Budget)
	}
	if cfg.Budget == 0 {
		cfg.Budget = 20 * time.Microsecond
	}
	if cfg.QueueDepth < 0 || cfg.MaxBatch < 0 || cfg.MaxVMs < 0 || cfg.PendingTimeout < 0 {
		return nil, fmt.Errorf("engine: queue depth, batch size, VM count and pending timeout must not be negative")
	}
	if cfg.QueueDepth == 0 {
		cfg.QueueDepth = 1 << 14
	}
	if cfg.QueueDepth > maxQueueDepth {
		return nil, fmt.Errorf("engine: queue depth %d: at most %d", cfg.QueueDepth, maxQueueDepth)
	}
	if cfg.MaxBatch == 0 {
		cfg.MaxBatch = 256
	}
	if cfg.MaxVMs == 0 {
		cfg.MaxVMs = 1024
	}
	if cfg.MaxVMs > maxVMs {
		return nil, fmt.Errorf("engine: at most %d VMs (Config.MaxVMs %d)", maxVMs, cfg.MaxVMs)
	}
	if cfg.MaxVMLabels == 0 {
		cfg.MaxVMLabels = 32
	}
	if cfg.PendingTimeout == 0 {
		cfg.PendingTimeout = time.Millisecond
	}
	e := &Engine{cfg: cfg, stopped: make(chan struct{}), vms: xsync.NewMapOf[vasmon.VMID, *vmEntry](),
		roots: xsync.NewMapOf[rootKey, *vasmon.Root](), owner: make([]*vmEntry, cfg.MaxVMs), freed: make([]uint64, cfg.MaxVMs),
		slotGen: make([]atomic.Uint32, cfg.MaxVMs), tickets: []*shard.Ticket{nil},
		panicRoots: xsync.NewMapOf[uint32, *atomic.Uint64](), waiters: xsync.NewMapOf[uint32, chan struct{}]()}
	for i := 0; i < cfg.Shards; i++ {
		cpu := -1
		if cfg.Pin && !cfg.NoPin {
			cpu = cfg.CPUs[i%len(cfg.CPUs)]
		}
		e.shards = append(e.shards, shard.New(shard.Config{ID: i, CPU: cpu, QueueDepth: cfg.QueueDepth,
			MaxBatch: cfg.MaxBatch, Budget: cfg.Budget, MaxSlots: cfg.MaxVMs, Spin: cfg.Spin,
			PendingTimeout: cfg.PendingTimeout, Flood: cfg.Flood, HoldClock: cfg.Driver == nil}, sink{e}))
	}
	e.reshare(0)
	if cfg.Driver == nil {
		for _, s := range e.shards {
			s.Start()
		}
	}
	return e, nil
}

// reshare sets each VM's share of a shard queue for n VMs: half the queue
// divided among them, so that the VMs within their share fit in the half
// that VMs past theirs may not fill.
func (e *Engine) reshare(n int) {
	e.share.Store(int32(max(1, e.cfg.QueueDepth/(2*max(1, n)))))
}

const (
	maxShards     = 256
	maxQueueDepth = 1 << 24
	// maxVMs bounds Config.MaxVMs: a VM's counter slot travels in an
	// event's 16 bits.
	maxVMs = 1<<16 - 1
)

// Config returns the engine's effective configuration.
func (e *Engine) Config() Config { return e.cfg }

// Shards returns the engine's shards (for metrics, tests and drivers).
func (e *Engine) Shards() []*shard.Shard { return e.shards }

// PinErrors returns why workers could not be pinned, one error per shard
// that runs unpinned.
func (e *Engine) PinErrors() []error {
	var errs []error
	for _, s := range e.shards {
		if s.PinErr != nil {
			errs = append(errs, s.PinErr)
		}
	}
	return errs
}

type sink struct{ e *Engine }

func (k sink) Route(vm *vasmon.VM, gpa uint64) *shard.Shard {
	return k.e.shards[k.e.shardOfHash(vasmon.PageHash(vm.Key, gpa))]
}

func (k sink) Ticket(h uint16) *shard.Ticket {
	k.e.tmu.Lock()
	t := k.e.tickets[h]
	k.e.tmu.Unlock()
	return t
}

func (k sink) Settled(r *vasmon.Root) {
	if ch, ok := k.e.waiters.Load(r.ID); ok {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

func (k sink) Panic(r *vasmon.Root, v any) {
	c, _ := k.e.panicRoots.LoadOrCompute(r.ID, func() *atomic.Uint64 { return new(atomic.Uint64) })
	c.Add(1)
	if f := k.e.cfg.OnPanic; f != nil {
		f(r, v)
	}
}

func (k sink) SlotEpoch() uint64           { return k.e.epoch.Load() }
func (k sink) SlotGen(slot uint16) uint32  { return k.e.slotGen[slot].Load() }
func (k sink) Shards() []*shard.Shard      { return k.e.shards }
func (e *Engine) shardOfHash(h uint64) int { return int((h >> 32) * uint64(len(e.shards)) >> 32) }
func (e *Engine) shardOf(slot uint16, gpa uint64) int {
	return e.shardOfHash(vasmon.PageHash(vasmon.VMID(slot), gpa))
}

// ShardOf returns the index of the shard that owns page gpa of vm (-1 for
// an unknown VM).
func (e *Engine) ShardOf(vm vasmon.VMID, gpa uint64) int {
	ve, ok := e.vms.Load(vm)
	if !ok {
		return -1
	}
	return e.shardOf(ve.slot, gpa)
}

// reentrant reports whether the calling OS thread is running a shard's step
// (a callback calling back into the engine).
func (e *Engine) reentrant() bool {
	tid := int64(unix.Gettid())
	for _, s := range e.shards {
		if s.OwnerThread() == tid {
			return true
		}
	}
	return false
}

// AddVM registers a guest with its memory and write protection (from a
// backend). maxTables is the VM's table budget (0: vasmon's default). It
// does not wait for the shards.
func (e *Engine) AddVM(id vasmon.VMID, mem vasmon.Memory, prot vasmon.Protector, maxTables int64) error {
	if e.closed.Load() {
		return ErrClosed
	}
	if mem == nil || prot == nil {
		return fmt.Errorf("engine: VM %d needs a memory and a protector", id)
	}
	e.slotMu.Lock()
	defer e.slotMu.Unlock()
	if _, ok := e.vms.Load(id); ok {
		return vasmon.ErrVMExists
	}
	slot, busy := -1, false // a never-used slot, else the longest-free drained one
	for i, o := range e.owner {
		if o == nil {
			slot = i
			break
		}
		if e.freed[i] != 0 && (slot < 0 || e.freed[i] < e.freed[slot]) {
			if !e.drained(o) {
				busy = true
				continue
			}
			slot = i
		}
	}
	if slot < 0 {
		if busy {
			return ErrSlotBusy
		}
		return fmt.Errorf("%w: the engine holds at most %d (Config.MaxVMs)", ErrTooMany, e.cfg.MaxVMs)
	}
	if old := e.owner[slot]; old != nil && slot >= e.cfg.MaxVMLabels {
		// Its counts stay in the "other" series (metrics), which must not
		// go backwards.
		v := e.vmStats(old)
		g := &e.gone
		g.submitted += v.Submitted
		g.rejected += v.Rejected
		for k := range g.kinds {
			g.kinds[k] += v.Kinds[k]
		}
		g.callbacks += v.Callbacks
		g.over += v.OverBudget
	}
	ve := &vmEntry{vm: vasmon.NewVM(id, mem, prot, maxTables), slot: uint16(slot)}
	ve.vm.Slot = uint32(slot)
	ve.vm.Key = vasmon.VMID(slot)
	e.slotGen[slot].Add(1)
	e.epoch.Add(1)
	e.vms.Store(id, ve)
	e.owner[slot], e.freed[slot] = ve, 0
	e.reshare(e.vms.Size())
	return nil
}

// drained reports whether every event of ve accepted has been processed.
func (e *Engine) drained(ve *vmEntry) bool {
	target := ve.submitted.Load() - ve.rejected.Load()
	var n uint64
	for _, s := range e.shards {
		c := &s.VMs[ve.slot]
		if c.Gen.Load() != e.slotGen[ve.slot].Load() {
			continue
		}
		for k := range c.Kinds {
			n += c.Kinds[k].Load()
		}
	}
	return n >= target
}

// RemoveVM stops every root of the VM (reporting their mappings removed) and
// forgets the VM. Its events still queued are processed as untracked; its
// counter slot is reused only once they are.
func (e *Engine) RemoveVM(ctx context.Context, id vasmon.VMID) error {
	if e.reentrant() {
		return ErrReentrant
	}
	ve, ok := e.vms.Load(id)
	if !ok {
		return vasmon.ErrUnknownVM
	}
	var rs []*vasmon.Root
	e.roots.Range(func(k rootKey, r *vasmon.Root) bool {
		if k.vm == id {
			rs = append(rs, r)
		}
		return true
	})
	slices.SortFunc(rs, func(a, b *vasmon.Root) int { return int(a.ID) - int(b.ID) }) // (deterministic)
	var errs []error
	for _, r := range rs {
		if err := e.Stop(ctx, r); err != nil && !errors.Is(err, vasmon.ErrUnknownRoot) {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	e.slotMu.Lock()
	defer e.slotMu.Unlock()
	if cur, ok := e.vms.Load(id); !ok || cur != ve {
		return vasmon.ErrUnknownVM
	}
	e.vms.Delete(id)
	e.refusedGone.Add(ve.vm.Refused())
	e.frees++
	e.freed[ve.slot] = e.frees
	ve.removed = true
	e.reshare(e.vms.Size())
	return nil
}

// Start monitors (vm, cr3) and returns once every table of the tree is hooked.
// If ctx ends first, whatever was hooked is unhooked (in the background) and
// ctx's error returned. If the engine closes first, Start returns ErrClosed.
func (e *Engine) Start(ctx context.Context, vm vasmon.VMID, cr3 uint64, mode vasmon.Mode, monitored uint64,
	cb vasmon.Callback, cbctx any, opts RootOptions) (*vasmon.Root, error) {
	if e.closed.Load() {
		return nil, ErrClosed
	}
	if e.reentrant() {
		return nil, ErrReentrant
	}
	ve, ok := e.vms.Load(vm)
	if !ok {
		return nil, vasmon.ErrUnknownVM
	}
	rs := &shard.RootState{}
	if opts.Verdict != nil {
		verdict := opts.Verdict
		if opts.SerializeCallbacks {
			var mu sync.Mutex
			inner := verdict
			verdict = func(c any, va, old, new, size uint64) shard.Verdict {
				mu.Lock()
				defer mu.Unlock()
				return inner(c, va, old, new, size)
			}
		}
		rs.Verdict = verdict
		cb = func(any, uint64, uint64, uint64, uint64) {}
	} else if opts.Traced != nil {
		traced := opts.Traced
		if opts.SerializeCallbacks {
			var mu sync.Mutex
			inner := traced
			traced = func(c any, va, old, new, size uint64, trap int64) {
				mu.Lock()
				defer mu.Unlock()
				inner(c, va, old, new, size, trap)
			}
		}
		rs.Traced = traced
		cb = func(any, uint64, uint64, uint64, uint64) {}
	} else if opts.SerializeCallbacks && cb != nil {
		var mu sync.Mutex
		inner := cb
		cb = func(c any, va, old, new, size uint64) {
			mu.Lock()
			defer mu.Unlock()
			inner(c, va, old, new, size)
		}
	}
	r, err := vasmon.NewRoot(e.nextID.Add(1), ve.vm, cr3, mode, monitored, cb, cbctx, opts.Options)
	if err != nil {
		return nil, err
	}
	r.Exec = rs
	gpa := r.RootGPA()
	if !ve.vm.Mem.InRAM(gpa, uint64(mode.TableBytes(mode.Levels()))) {
		return nil, fmt.Errorf("%w: CR3 %#x", vasmon.ErrRootOutside, cr3)
	}
	key := rootKey{vm, cr3}
	if _, loaded := e.roots.LoadOrStore(key, r); loaded {
		return nil, vasmon.ErrRootExists
	}
	ve.roots.Add(1)
	// Let the VM's events submitted so far reach the shadows first, so the
	// new tree starts from what the caller's walk of memory shows.
	if err := e.waitVM(ctx, ve); err != nil {
		_ = e.stop(ctx, key, r, false) // (unhooked in the background)
		return nil, err
	}
	e.send(vasmon.Request{Root: r, GPA: gpa, Level: uint8(mode.Levels()), Op: vasmon.OpHook})
	if err := e.waitRoot(ctx, r); err != nil {
		_ = e.stop(ctx, key, r, false) // (unhooked in the background)
		return nil, err
	}
	if r.Tables() == 0 {
		_ = e.stop(context.Background(), key, r, false)
		if r.Stats().Refused > 0 {
			return nil, fmt.Errorf("%w: root %#x of VM %d", vasmon.ErrBudget, cr3, vm)
		}
		return nil, fmt.Errorf("engine: cannot read or protect the root table at %#x of VM %d", gpa, vm)
	}
	return r, nil
}

func (e *Engine) send(req vasmon.Request) {
	shard.StateOf(req.Root).InFlight.Add(1)
	if req.Op == vasmon.OpUnhook {
		shard.StateOf(req.Root).Unhooks.Add(1)
	}
	e.shards[e.shardOf(uint16(req.Root.VM.Key), req.Page())].Send(shard.Msg{Req: req, Trap: shard.Now()})
}

// waitVM waits until the events of ve accepted before the call have been
// processed.
func (e *Engine) waitVM(ctx context.Context, ve *vmEntry) error {
	target := ve.submitted.Load() - ve.rejected.Load()
	return e.poll(ctx, func() bool {
		var n uint64
		for _, s := range e.shards {
			c := &s.VMs[ve.slot]
			for k := range c.Kinds {
				n += c.Kinds[k].Load()
			}
		}
		return n >= target
	})
}

// waitRoot waits until r has no structural request in flight. The shard
// that settles the root wakes it; a slow timer covers nothing else.
func (e *Engine) waitRoot(ctx context.Context, r *vasmon.Root) error {
	rs := shard.StateOf(r)
	if rs.InFlight.Load() == 0 {
		return nil
	}
	if e.cfg.Driver != nil {
		return e.poll(ctx, func() bool { return rs.InFlight.Load() == 0 })
	}
	ch := make(chan struct{}, 1)
	e.waiters.Store(r.ID, ch)
	defer e.waiters.Delete(r.ID)
	t := time.NewTimer(time.Millisecond)
	defer t.Stop()
	for rs.InFlight.Load() != 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-e.stopped:
			if rs.InFlight.Load() != 0 {
				return ErrClosed
			}
		case <-ch:
		case <-t.C:
			t.Reset(time.Millisecond)
		}
	}
	return nil
}

// poll waits until done reports true, ctx ends, or the engine's workers
// have stopped (ErrClosed). Under a Driver it yields to the driver.
func (e *Engine) poll(ctx context.Context, done func() bool) error {
	d := 20 * time.Microsecond
	for !done() {
		if err := ctx.Err(); err != nil {
			return err
		}
		select {
		case <-e.stopped:
			if done() {
				return nil
			}
			return ErrClosed
		default:
		}
		if e.cfg.Driver != nil {
			e.cfg.Driver.Wait()
			continue
		}
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-e.stopped:
		case <-t.C:
		}
		d = min(2*d, 2*time.Millisecond)
	}
	return nil
}

// Stop stops monitoring r: the partial writes of r's tables end first
// (vasmon.Store.FlushRoot; other roots' go on), then every table is
// unhooked and every present leaf is reported removed. It returns once
// that is done. If ctx ends first, Stop returns
// ctx's error and the unhooking completes in the background: the root is
// already gone from the engine (a second Stop returns ErrUnknownRoot) and
// Sync and Close wait for it. If the engine closes first, Stop returns
// ErrClosed.
func (e *Engine) Stop(ctx context.Context, r *vasmon.Root) error {
	if r == nil {
		return vasmon.ErrUnknownRoot
	}
	if e.reentrant() {
		return ErrReentrant
	}
	key := rootKey{r.VM.ID, r.CR3}
	if cur, ok := e.roots.Load(key); !ok || cur != r {
		return vasmon.ErrUnknownRoot
	}
	return e.stop(ctx, key, r, true)
}

// StopCR3 stops the root (vm, cr3).
func (e *Engine) StopCR3(ctx context.Context, vm vasmon.VMID, cr3 uint64) error {
	r, ok := e.roots.Load(rootKey{vm, cr3})
	if !ok {
		return vasmon.ErrUnknownRoot
	}
	return e.Stop(ctx, r)
}

func (e *Engine) stop(ctx context.Context, key rootKey, r *vasmon.Root, flush bool) error {
	deleted := false
	e.roots.Compute(key, func(old *vasmon.Root, loaded bool) (*vasmon.Root, bool) {
		deleted = loaded && old == r
		return old, deleted || !loaded
	})
	if !deleted {
		return vasmon.ErrUnknownRoot
	}
	if ve, _ := e.vms.Load(key.vm); ve != nil {
		ve.roots.Add(-1)
	}
	if flush {
		// Partial writes end while the tree still proves them.
		e.flushPartial(ctx, r)
	}
	// From here on hooks of the root are ignored; the unhook walks what
	// is hooked and nothing can be hooked behind it.
	r.MarkStopped()
	if e.stoppedNow() {
		return ErrClosed
	}
	e.send(vasmon.Request{Root: r, GPA: r.RootGPA(), Level: uint8(r.Mode.Levels()), Op: vasmon.OpUnhook})
	return e.waitRoot(ctx, r)
}

func (e *Engine) stoppedNow() bool {
	select {
	case <-e.stopped:
		return true
	default:
		return false
	}
}

// flushPartial ends the partial writes of root r's tables pending in any
// shard (vasmon.Store.FlushRoot) and waits (at most until ctx ends) for
// what that produced.
func (e *Engine) flushPartial(ctx context.Context, r *vasmon.Root) {
	sent := false
	for _, s := range e.shards {
		if s.C.Partial.Load() > 0 {
			s.Send(shard.Msg{Op: shard.MsgFlush, Req: vasmon.Request{Root: r}, Trap: shard.Now()})
			sent = true
		}
	}
	if sent {
		_ = e.poll(ctx, e.idle)
	}
}

// Root returns the monitored root (vm, cr3), or nil.
func (e *Engine) Root(vm vasmon.VMID, cr3 uint64) *vasmon.Root {
	r, _ := e.roots.Load(rootKey{vm, cr3})
	return r
}

// Roots returns every monitored root.
func (e *Engine) Roots() []*vasmon.Root {
	var rs []*vasmon.Root
	e.roots.Range(func(_ rootKey, r *vasmon.Root) bool {
		rs = append(rs, r)
		return true
	})
	return rs
}

// Submit queues events of VM vm, in order, for asynchronous processing. The
// events are copied; evs may be reused when Submit returns. Events with
// Trap == 0 are stamped now. The backend must have applied every write of
// evs to guest memory before it calls Submit.
//
// When a shard queue is full, Submit waits (default) or, with
// Config.NonBlocking, stops and returns ErrOverload: it then returns n, the
// number of events queued, and evs[n:] were rejected (counted) and may be
// submitted again. (The second part of a store that crosses a page boundary
// always waits for room: a store is queued whole or not at all.) Submit
// returns ErrClosed, with the rest rejected, once Close has begun.
func (e *Engine) Submit(vm vasmon.VMID, evs []shard.Event) (int, error) {
	return e.submit(vm, evs, 0, nil)
}

const submitChunk = 64

// submit queues evs. With a ticket, every part queued is one item of its
// closure.
func (e *Engine) submit(vm vasmon.VMID, evs []shard.Event, ticket uint16, t *shard.Ticket) (int, error) {
	e.active.Add(1)
	defer e.active.Add(-1)
	if e.closed.Load() {
		e.submitted.Add(uint64(len(evs)))
		e.rejected.Add(uint64(len(evs)))
		return 0, ErrClosed
	}
	ve, ok := e.vms.Load(vm)
	if !ok {
		e.submitted.Add(uint64(len(evs)))
		e.rejected.Add(uint64(len(evs)))
		return 0, vasmon.ErrUnknownVM
	}
	var b batch
	b.now = shard.Now()
	for base := 0; base < len(evs); base += submitChunk {
		b.reset()
		chunk := evs[base:min(base+submitChunk, len(evs))]
		for i := range chunk {
			ev := &chunk[i]
			if ev.Size == 0 || ev.Size > 8 {
				if n, err := e.flushBatch(ve, &b, ticket, t); err != nil {
					return n, err
				}
				rest := uint64(len(evs) - base - i)
				e.submitted.Add(rest)
				e.rejected.Add(rest)
				ve.submitted.Add(rest)
				ve.rejected.Add(rest)
				return base + i, ErrBadSubmits
			}
			b.add(e, ve.slot, ev, ticket, base+i)
			if e.cfg.NonBlocking {
				// One store at a time, so the events queued are a
				// prefix of evs.
				if n, err := e.flushBatch(ve, &b, ticket, t); err != nil {
					e.reject(ve, uint64(len(evs)-n-1))
					return n, err
				}
				b.reset()
			}
		}
		if n, err := e.flushBatch(ve, &b, ticket, t); err != nil {
			return n, err
		}
	}
	return len(evs), nil
}

// batch is a chunk of events split into parts (a store across a page
// boundary makes two), each with its shard, on the stack.
type batch struct {
	now int64
	n   int
	// mixed says the parts go to more than one shard (else all to
	// owner[0]): only then are they copied into buf, one shard's at a time.
	mixed bool
	parts [2 * submitChunk]shard.Event
	owner [2 * submitChunk]uint16
	src   [2 * submitChunk]int // index in the caller's events
	done  [2 * submitChunk]bool
	buf   [2 * submitChunk]shard.Event
	which [2 * submitChunk]int
}

func (b *batch) reset() { b.n, b.mixed = 0, false }

// add adds one event, stamped and split per page. It copies the event
// once, into its part.
func (b *batch) add(e *Engine, slot uint16, ev *shard.Event, ticket uint16, src int) {
	i := b.n
	a := &b.parts[i]
	*a = *ev
	if a.Trap == 0 {
		a.Trap = b.now
	}
	a.Slot, a.Ticket, a.Cont = slot, ticket, false
	b.put(e, i, src)
	first := vasmon.PageSize - a.GPA%vasmon.PageSize
	if uint64(a.Size) <= first {
		return
	}
	c := &b.parts[i+1]
	*c = *a
	a.Size, a.Ver2 = uint8(first), 0
	c.GPA, c.Size, c.Data = a.GPA+first, c.Size-uint8(first), c.Data>>(8*first)
	c.Ver, c.Ver2, c.HasOld, c.Old, c.Cont = c.Ver2, 0, false, 0, true
	b.put(e, i+1, src)
}

// put takes part i, from the caller's event src, into the batch.
func (b *batch) put(e *Engine, i, src int) {
	b.src[i], b.done[i] = src, false
	o := uint16(e.shardOf(b.parts[i].Slot, b.parts[i].GPA))
	b.owner[i] = o
	if i > 0 && o != b.owner[0] {
		b.mixed = true
	}
	b.n = i + 1
}

// reject counts n events rejected.
func (e *Engine) reject(ve *vmEntry, n uint64) {
	e.submitted.Add(n)
	e.rejected.Add(n)
	ve.submitted.Add(n)
	ve.rejected.Add(n)
}

// flushBatch queues the parts of b, each shard's as one run in order. On an
// error it returns how many of the caller's events were queued whole before
// the first that was not, and counts the parts not queued as rejected.
func (e *Engine) flushBatch(ve *vmEntry, b *batch, ticket uint16, t *shard.Ticket) (int, error) {
	if b.n == 0 {
		return 0, nil
	}
	parts := uint64(b.n)
	e.submitted.Add(parts)
	ve.submitted.Add(parts)
	if t != nil {
		t.Add(int64(parts))
	}
	for i := 0; i < b.n; i++ {
		if b.done[i] {
			continue
		}
		// This shard's parts, in order: all of them in place, or copied.
		run, which := b.parts[:b.n], b.which[:b.n]
		if b.mixed {
			n := 0
			for j := i; j < b.n; j++ {
				if !b.done[j] && b.owner[j] == b.owner[i] {
					b.buf[n], b.which[n] = b.parts[j], j
					n++
				}
			}
			run, which = b.buf[:n], b.which[:n]
		} else {
			for j := range which {
				which[j] = j
			}
		}
		n := len(run)
		s := e.shards[b.owner[i]]
		share := e.share.Load()
		for sent, spin := 0, 0; sent < n; spin++ {
			k := 0
			// Fair ingest: a VM with more than its share queued waits (or
			// is refused) once the queue is half full, so a VM within its
			// share never finds the queue full (see Config.NonBlocking).
			if q := s.Queued(ve.slot); q+int32(n-sent) <= share || s.QueueLen() <= s.QueueCap()/2 || run[sent].Cont {
				k, _ = s.TryEnqueueBatch(run[sent:n])
			}
			s.AddQueued(ve.slot, k)
			for _, j := range which[sent : sent+k] {
				b.done[j] = true
			}
			sent += k
			if k > 0 {
				continue
			}
			var err error
			switch {
			case e.closed.Load():
				err = ErrClosed
			case e.cfg.NonBlocking && !run[sent].Cont:
				err = ErrOverload
			default:
				err = e.wait(s, spin)
			}
			if err != nil {
				var lost uint64
				first := -1
				for j := 0; j < b.n; j++ {
					if !b.done[j] {
						lost++
						if first < 0 {
							first = b.src[j]
						}
					}
				}
				e.rejected.Add(lost)
				ve.rejected.Add(lost)
				e.accepted.Add(parts - lost)
				if t != nil {
					t.Add(-int64(lost))
				}
				return first, err
			}
		}
	}
	e.accepted.Add(parts)
	return b.src[b.n-1] + 1, nil
}

// wait lets a producer that found shard s's queue full wait for room.
func (e *Engine) wait(s *shard.Shard, spin int) error {
	if e.cfg.Driver != nil {
		e.cfg.Driver.Wait()
		return nil
	}
	if spin < 4 {
		runtime.Gosched()
		return nil
	}
	if e.reentrant() {
		return ErrReentrant
	}
	// Nobody may be running the shard: help, then wait for the worker.
	if s.TryAcquire() {
		runtime.LockOSThread()
		s.SetOwnerThread(int64(unix.Gettid()))
		s.Step(0)
		s.SetOwnerThread(0)
		s.Release()
		runtime.UnlockOSThread()
		return nil
	}
	s.WaitSpace()
	return nil
}

// Sync waits until the engine is quiescent (SEMANTICS.md section 6): every
// event accepted so far processed, every structural request executed, every
// partial write ended and every page whose read was given up read again; or
// until ctx ends. Submissions made concurrently with Sync may or may not be
// waited for.
func (e *Engine) Sync(ctx context.Context) error {
	if e.reentrant() {
		return ErrReentrant
	}
	for round := 0; ; round++ {
		if err := e.poll(ctx, e.idle); err != nil {
			return err
		}
		sent := false
		for _, s := range e.shards {
			// (Flooded pages are read once per Sync: they would always
			// have something to read.)
			if s.C.Partial.Load() > 0 || s.C.Dirty.Load() > 0 || s.C.Retrying.Load() > 0 || round == 0 && s.C.Polled.Load() > 0 {
				s.Send(shard.Msg{Op: shard.MsgFlush, Trap: shard.Now()})
				sent = true
			}
		}
		if !sent {
			return nil
		}
		if e.stoppedNow() {
			return ErrClosed
		}
	}
}

// idle reports whether every accepted event has been processed and every
// message executed, and no hook is held or waiting to run again.
func (e *Engine) idle() bool {
	acc := e.accepted.Load()
	var processed, in uint64
	for _, s := range e.shards {
		processed += s.C.Processed.Load()
		in += s.C.MsgsIn.Load()
	}
	var recv uint64
	for _, s := range e.shards {
		recv += s.C.MsgsRecv.Load()
		if s.C.Held.Load() != 0 {
			return false
		}
	}
	if processed != acc || in != recv {
		return false
	}
	for _, s := range e.shards {
		if s.C.Retrying.Load() != 0 && s.C.Held.Load() == 0 && !s.HasWork() {
			// Work that guest memory made unsure is retried when
			// the shard is otherwise idle; nudge it.
			if e.cfg.Driver == nil {
				s.Send(shard.Msg{Op: shard.MsgFlush, Trap: shard.Now()})
			}
			return false
		}
	}
	return true
}

// Close stops accepting events and roots, waits for producers inside Submit
// to return, brings the engine to a quiescent point (Sync), and stops the
// workers. Roots still monitored stay hooked in the guests' protection until
// the backend drops them. Close is idempotent; called from a callback it
// returns ErrReentrant.
func (e *Engine) Close() error {
	if e.reentrant() {
		return ErrReentrant
	}
	e.closeOnce.Do(func() {
		e.closed.Store(true)
		for e.active.Load() != 0 {
			if e.cfg.Driver != nil {
				e.cfg.Driver.Wait()
			} else {
				time.Sleep(10 * time.Microsecond)
			}
		}
		_ = e.Sync(context.Background())
		for _, s := range e.shards {
			s.Stop()
		}
		close(e.stopped)
	})
	return nil
}

// acquire takes shard s's ownership token, waiting for its holder.
func (e *Engine) acquire(s *shard.Shard) {
	for !s.TryAcquire() {
		if e.cfg.Driver != nil {
			e.cfg.Driver.Wait()
		} else {
			runtime.Gosched()
		}
	}
}

// Dump brings the engine to a quiescent point (Sync) and returns the tables
// of r from every shard, highest level first.
func (e *Engine) Dump(ctx context.Context, r *vasmon.Root) ([]vasmon.TableInfo, error) {
	if err := e.Sync(ctx); err != nil && !errors.Is(err, ErrClosed) {
		return nil, err
	}
	var all []vasmon.TableInfo
	for _, s := range e.shards {
		e.acquire(s)
		all = s.Dump(r, all)
		s.Release()
	}
	vasmon.SortTables(all)
	return all, nil
}
