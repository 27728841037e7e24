// Package engine monitors the page tables of many VMs on one host with a set
// of shards (package shard), each owning the table nodes of the guest pages
// hashed to it and running one worker goroutine pinned to a host CPU.
//
// # Contract
//
// Routing: the page at guest-physical address gpa of VM vm belongs to shard
// xxhash(vm, gpa/4096) mod N (the hash's high 32 bits, by multiply-shift), for
// the engine's lifetime.
//
// Concurrency: every method is safe for concurrent use. Submit may be called
// from many producer goroutines (backend vCPU threads) at once.
//
// Ordering: events that write the same page-table entry are applied in the
// order their Submit calls were made (a backend that lets two vCPUs write one
// entry must serialize those submissions, as it serializes the stores). Hook
// and unhook messages from one shard to another are applied in the order
// they were sent. Nothing orders events of different pages across shards:
// a write to a table racing with the write that links or unlinks it may be
// seen before or after the link; the monitor then reports the table's
// contents at hook time as new mappings and its contents at unhook time as
// removed, so after Sync every root satisfies the oracle of SEMANTICS.md
// section 6, but the callback stream can differ from the single-threaded
// vasmon.Monitor's by such a pair.
//
// Callbacks: a root's callbacks run on the worker goroutines of the shards
// that own its tables, so callbacks of one root may run concurrently on
// different workers. RootOptions.SerializeCallbacks runs them one at a time.
// A callback must not block for long: it delays its shard. A panicking
// callback is recovered, counted, reported to Config.OnPanic with its root,
// and the shard keeps running.
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
// nothing; workers allocate nothing in steady state (see the tests).
//
// Accounting: every submitted event is either processed or rejected with an
// error (Stats: Submitted == Processed + Rejected once Sync or Close returns).
package engine

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/puzpuzpuz/xsync/v3"

	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// Config configures an engine. The zero value is valid: one pinned shard per
// CPU the process may use, blocking submits, a 20 us latency budget.
type Config struct {
	Shards      int           // number of shards; 0: one per allowed CPU
	CPUs        []int         // host CPUs to pin shards to, round robin; nil: the allowed set
	NoPin       bool          // run workers unpinned
	QueueDepth  int           // events per shard queue; 0: 16384
	MaxBatch    int           // events drained per batch; 0: 256
	Budget      time.Duration // trap-to-callback latency budget; 0: 20 us
	NonBlocking bool          // Submit returns ErrOverload instead of waiting when a queue is full
	MaxVMs      int           // VMs registered at once, at most 65535; 0: 1024
	MaxVMLabels int           // VMs with their own metric label; the rest are "other"; 0: 32
	// Spin is how long an idle worker polls its queue before it parks; 0:
	// 50 us, negative: park at once. Waking a parked worker costs the
	// operating system's thread wake-up (20-80 us measured on the project's
	// machine, more than the default budget), so an engine held to a
	// budget of tens of microseconds at a steady event rate should poll
	// longer than the gaps between events, at the price of a busy CPU.
	Spin time.Duration
	// OnPanic is told of each recovered callback panic; nil logs nothing.
	OnPanic func(root *vasmon.Root, v any)
}

// Errors.
var (
	ErrOverload = errors.New("engine: shard queue full (non-blocking mode)")
	ErrClosed   = errors.New("engine: closed")
	ErrTooMany  = errors.New("engine: too many VMs")
)

// RootOptions are per-root options: vasmon's, plus the engine's own.
type RootOptions struct {
	vasmon.Options
	// SerializeCallbacks runs the root's callbacks one at a time even when
	// its tables live on different shards.
	SerializeCallbacks bool
}

type rootKey struct {
	vm  vasmon.VMID
	cr3 uint64
}

type vmEntry struct {
	vm        *vasmon.VM
	slot      uint32
	submitted atomic.Uint64
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
	// which happens to the longest-free slot first.
	owner []*vmEntry
	freed []uint64
	frees uint64

	submitted, accepted, rejected atomic.Uint64
	active                        atomic.Int64
	closed                        atomic.Bool
	closeOnce                     sync.Once
	stopped                       chan struct{} // closed once Close has stopped the workers
	panicRoots                    *xsync.MapOf[uint32, *atomic.Uint64]
	refusedGone                   atomic.Int64 // hook refusals of removed VMs
	waiters                       *xsync.MapOf[uint32, chan struct{}]
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
	if cfg.QueueDepth < 0 || cfg.MaxBatch < 0 || cfg.MaxVMs < 0 {
		return nil, fmt.Errorf("engine: queue depth, batch size and VM count must not be negative")
	}
	if cfg.QueueDepth == 0 {
		cfg.QueueDepth = 1 << 14
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
	e := &Engine{cfg: cfg, stopped: make(chan struct{}), vms: xsync.NewMapOf[vasmon.VMID, *vmEntry](),
		roots: xsync.NewMapOf[rootKey, *vasmon.Root](), owner: make([]*vmEntry, cfg.MaxVMs), freed: make([]uint64, cfg.MaxVMs),
		panicRoots: xsync.NewMapOf[uint32, *atomic.Uint64](), waiters: xsync.NewMapOf[uint32, chan struct{}]()}
	for i := 0; i < cfg.Shards; i++ {
		cpu := cfg.CPUs[i%len(cfg.CPUs)]
		if cfg.NoPin {
			cpu = -1
		}
		e.shards = append(e.shards, shard.New(shard.Config{ID: i, CPU: cpu, QueueDepth: cfg.QueueDepth,
			MaxBatch: cfg.MaxBatch, Budget: cfg.Budget, MaxSlots: cfg.MaxVMs, Spin: cfg.Spin}, sink{e}))
	}
	for _, s := range e.shards {
		s.Start()
	}
	return e, nil
}

// Config returns the engine's effective configuration.
func (e *Engine) Config() Config { return e.cfg }

// Shards returns the engine's shards (for metrics and tests).
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

func (k sink) Route(vm vasmon.VMID, gpa uint64) *shard.Shard { return k.e.route(vm, gpa) }

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

// ShardOf returns the index of the shard that owns page gpa of vm.
func (e *Engine) ShardOf(vm vasmon.VMID, gpa uint64) int {
	return e.shardOfHash(vasmon.PageHash(vm, gpa))
}

// shardOfHash maps a page hash to a shard by multiply-shift of its high 32
// bits; the stores index pages by its low bits, so the two stay independent.
func (e *Engine) shardOfHash(h uint64) int {
	return int((h >> 32) * uint64(len(e.shards)) >> 32)
}

func (e *Engine) route(vm vasmon.VMID, gpa uint64) *shard.Shard {
	return e.shards[e.ShardOf(vm, gpa)]
}

// AddVM registers a guest with its memory and write protection (from a
// backend). maxTables is the VM's table budget (0: vasmon's default).
func (e *Engine) AddVM(id vasmon.VMID, mem vasmon.Memory, prot vasmon.Protector, maxTables int64) error {
	if e.closed.Load() {
		return ErrClosed
	}
	if mem == nil || prot == nil {
		return fmt.Errorf("engine: VM %d needs a memory and a protector", id)
	}
	e.slotMu.Lock()
	if _, ok := e.vms.Load(id); ok {
		e.slotMu.Unlock()
		return vasmon.ErrVMExists
	}
	slot := -1 // a never-used slot, else the longest-free one
	for i, o := range e.owner {
		if o == nil {
			slot = i
			break
		}
		if e.freed[i] != 0 && (slot < 0 || e.freed[i] < e.freed[slot]) {
			slot = i
		}
	}
	if slot < 0 {
		e.slotMu.Unlock()
		return fmt.Errorf("%w: the engine holds at most %d (Config.MaxVMs)", ErrTooMany, e.cfg.MaxVMs)
	}
	ve := &vmEntry{vm: vasmon.NewVM(id, mem, prot, maxTables), slot: uint32(slot)}
	ve.vm.Slot = uint32(slot)
	if _, loaded := e.vms.LoadOrStore(id, ve); loaded {
		e.slotMu.Unlock()
		return vasmon.ErrVMExists
	}
	e.owner[slot], e.freed[slot] = ve, 0
	e.slotMu.Unlock()
	for _, s := range e.shards {
		s.ResetSlot(uint32(slot))
	}
	return nil
}

// RemoveVM stops every root of the VM (reporting their mappings removed) and
// forgets the VM. Its events still queued are processed as untracked.
func (e *Engine) RemoveVM(ctx context.Context, id vasmon.VMID) error {
	ve, ok := e.vms.Load(id)
	if !ok {
		return vasmon.ErrUnknownVM
	}
	var errs []error
	e.roots.Range(func(k rootKey, r *vasmon.Root) bool {
		if k.vm == id {
			if err := e.Stop(ctx, r); err != nil && !errors.Is(err, vasmon.ErrUnknownRoot) {
				errs = append(errs, err)
			}
		}
		return true
	})
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	e.vms.Delete(id)
	e.refusedGone.Add(ve.vm.Refused())
	e.slotMu.Lock()
	e.frees++
	e.freed[ve.slot] = e.frees
	ve.removed = true
	e.slotMu.Unlock()
	return nil
}

// Start monitors (vm, cr3) and returns once every table of the tree is hooked.
// If ctx ends first, whatever was hooked is unhooked and ctx's error returned.
// If the engine closes first, Start returns ErrClosed.
func (e *Engine) Start(ctx context.Context, vm vasmon.VMID, cr3 uint64, mode vasmon.Mode, monitored uint64,
	cb vasmon.Callback, cbctx any, opts RootOptions) (*vasmon.Root, error) {
	if e.closed.Load() {
		return nil, ErrClosed
	}
	ve, ok := e.vms.Load(vm)
	if !ok {
		return nil, vasmon.ErrUnknownVM
	}
	if opts.SerializeCallbacks && cb != nil {
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
	gpa := r.RootGPA()
	if !ve.vm.Mem.InRAM(gpa, uint64(mode.TableBytes(mode.Levels()))) {
		return nil, fmt.Errorf("%w: CR3 %#x", vasmon.ErrRootOutside, cr3)
	}
	key := rootKey{vm, cr3}
	if _, loaded := e.roots.LoadOrStore(key, r); loaded {
		return nil, vasmon.ErrRootExists
	}
	ve.roots.Add(1)
	// Let the VM's events submitted so far reach the shadows first: a page
	// the new tree shares with the VM's other roots is not read again, and
	// its shadow must not lag what the caller's walk of memory shows.
	if err := e.waitVM(ctx, ve); err != nil {
		_ = e.stop(context.Background(), key, r)
		return nil, err
	}
	e.send(vasmon.Request{Root: r, GPA: gpa, Level: uint8(mode.Levels()), Op: vasmon.OpHook})
	if err := e.waitRoot(ctx, r); err != nil {
		_ = e.stop(context.Background(), key, r)
		return nil, err
	}
	if r.Tables() == 0 {
		_ = e.stop(context.Background(), key, r)
		if r.Stats().Refused > 0 {
			return nil, fmt.Errorf("%w: root %#x of VM %d", vasmon.ErrBudget, cr3, vm)
		}
		return nil, fmt.Errorf("engine: cannot read or protect the root table at %#x of VM %d", gpa, vm)
	}
	return r, nil
}

func (e *Engine) send(req vasmon.Request) {
	req.Root.InFlight.Add(1)
	e.route(req.Root.VM.ID, req.GPA).Send(shard.Msg{Req: req, Trap: shard.Now()})
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
	if r.InFlight.Load() == 0 {
		return nil
	}
	ch := make(chan struct{}, 1)
	e.waiters.Store(r.ID, ch)
	defer e.waiters.Delete(r.ID)
	t := time.NewTimer(time.Millisecond)
	defer t.Stop()
	for r.InFlight.Load() != 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-e.stopped:
			if r.InFlight.Load() != 0 {
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
// have stopped (ErrClosed).
func (e *Engine) poll(ctx context.Context, done func() bool) error {
	d := 20 * time.Microsecond
	for !done() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-e.stopped:
			if done() {
				return nil
			}
			return ErrClosed
		case <-time.After(d):
		}
		d = min(2*d, 2*time.Millisecond)
	}
	return nil
}

// Stop stops monitoring r: every table is unhooked and every present leaf is
// reported removed. It returns once that is done or ctx ends (the unhooking
// then completes in the background). If the engine closes first, Stop
// returns ErrClosed.
func (e *Engine) Stop(ctx context.Context, r *vasmon.Root) error {
	if r == nil {
		return vasmon.ErrUnknownRoot
	}
	key := rootKey{r.VM.ID, r.CR3}
	if cur, ok := e.roots.Load(key); !ok || cur != r {
		return vasmon.ErrUnknownRoot
	}
	return e.stop(ctx, key, r)
}

// StopCR3 stops the root (vm, cr3).
func (e *Engine) StopCR3(ctx context.Context, vm vasmon.VMID, cr3 uint64) error {
	r, ok := e.roots.Load(rootKey{vm, cr3})
	if !ok {
		return vasmon.ErrUnknownRoot
	}
	return e.Stop(ctx, r)
}

func (e *Engine) stop(ctx context.Context, key rootKey, r *vasmon.Root) error {
	deleted := false
	e.roots.Compute(key, func(old *vasmon.Root, loaded bool) (*vasmon.Root, bool) {
		deleted = loaded && old == r
		return old, deleted || !loaded
	})
	if !deleted {
		return vasmon.ErrUnknownRoot
	}
	ve, _ := e.vms.Load(key.vm)
	if ve != nil {
		ve.roots.Add(-1)
	}
	// Wait for the hooking to settle, so the unhook walks the final tree.
	if err := e.waitRoot(ctx, r); err != nil {
		return err
	}
	e.send(vasmon.Request{Root: r, GPA: r.RootGPA(), Level: uint8(r.Mode.Levels()), Op: vasmon.OpUnhook})
	err := e.waitRoot(ctx, r)
	r.MarkStopped()
	return err
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

// Submit queues events of VM vm, in order. The events are copied; evs may be
// reused when Submit returns. Events with Trap == 0 or Seen == 0 are stamped
// now (see shard.Event.Seen). The backend must have applied every write of
// evs to guest memory before it calls Submit.
//
// When a shard queue is full, Submit waits (default) or, with
// Config.NonBlocking, stops and returns ErrOverload: it then returns n, the
// number of events queued, and evs[n:] were rejected (counted) and may be
// submitted again. Submit returns ErrClosed, with the rest rejected, once
// Close has begun.
func (e *Engine) Submit(vm vasmon.VMID, evs []shard.Event) (int, error) {
	e.active.Add(1)
	defer e.active.Add(-1)
	e.submitted.Add(uint64(len(evs)))
	if e.closed.Load() {
		e.rejected.Add(uint64(len(evs)))
		return 0, ErrClosed
	}
	ve, ok := e.vms.Load(vm)
	if !ok {
		e.rejected.Add(uint64(len(evs)))
		return 0, vasmon.ErrUnknownVM
	}
	ve.submitted.Add(uint64(len(evs)))
	if e.cfg.NonBlocking {
		return e.submitEach(ve, vm, evs)
	}
	// Blocking: route a chunk at a time and queue each shard's events of the
	// chunk as one run (one compare-and-swap), in their order.
	var (
		now   int64
		owner [submitChunk]uint16
		done  [submitChunk]bool
		buf   [submitChunk]shard.Event
	)
	for base := 0; base < len(evs); base += submitChunk {
		part := evs[base:min(base+submitChunk, len(evs))]
		for i := range part {
			done[i] = false
			owner[i] = uint16(e.shardOfHash(vasmon.PageHash(vm, part[i].GPA)))
		}
		for i := range part {
			if done[i] {
				continue
			}
			n := 0
			for j := i; j < len(part); j++ {
				if done[j] || owner[j] != owner[i] {
					continue
				}
				ev := &buf[n]
				*ev = part[j]
				e.stamp(ev, vm, ve, &now)
				done[j] = true
				n++
			}
			s := e.shards[owner[i]]
			for sent, spin := 0, 0; sent < n; spin++ {
				k := s.TryEnqueueBatch(buf[sent:n])
				sent += k
				if k > 0 {
					continue
				}
				if e.closed.Load() {
					// Events of this chunk already queued for other shards
					// count as accepted; the rest are rejected.
					queued := base
					for j := range part {
						if done[j] {
							queued++
						}
					}
					queued -= n - sent
					rest := uint64(len(evs) - queued)
					e.rejected.Add(rest)
					ve.rejected.Add(rest)
					e.accepted.Add(uint64(queued))
					return queued, ErrClosed
				}
				if spin < 4 {
					runtime.Gosched()
				} else {
					s.WaitSpace()
				}
			}
		}
	}
	e.accepted.Add(uint64(len(evs)))
	return len(evs), nil
}

const submitChunk = 64

// maxVMs bounds Config.MaxVMs: a VM's counter slot travels in an event's
// 16 bits.
const maxVMs = 1<<16 - 1

// stamp completes an event for the shards. Seen, unless the backend set it,
// is taken once per Submit, after the backend applied the writes to guest
// memory (the contract), so a write seen before a hook read its page is
// known to be in the read. A backend's Seen later than now is clamped.
func (e *Engine) stamp(ev *shard.Event, vm vasmon.VMID, ve *vmEntry, now *int64) {
	ev.VM, ev.Slot = uint32(vm), uint16(ve.slot)
	if *now == 0 {
		*now = shard.Now()
	}
	if ev.Seen == 0 || ev.Seen > *now {
		ev.Seen = *now
	}
	if ev.Trap == 0 {
		ev.Trap = *now
	}
}

// submitEach queues events one by one and stops at the first that does not
// fit (non-blocking mode), so the events queued are a prefix of evs.
func (e *Engine) submitEach(ve *vmEntry, vm vasmon.VMID, evs []shard.Event) (int, error) {
	var now int64
	for i := range evs {
		ev := evs[i]
		e.stamp(&ev, vm, ve, &now)
		if !e.shards[e.shardOfHash(vasmon.PageHash(vm, ev.GPA))].TryEnqueue(&ev) {
			err := ErrOverload
			if e.closed.Load() {
				err = ErrClosed
			}
			rest := uint64(len(evs) - i)
			e.rejected.Add(rest)
			ve.rejected.Add(rest)
			e.accepted.Add(uint64(i))
			return i, err
		}
	}
	e.accepted.Add(uint64(len(evs)))
	return len(evs), nil
}

// Sync waits until every event accepted so far has been processed and every
// structural message executed (the engine is quiescent), or ctx ends.
// Submissions made concurrently with Sync may or may not be waited for.
func (e *Engine) Sync(ctx context.Context) error {
	return e.poll(ctx, e.quiescent)
}

func (e *Engine) quiescent() bool {
	acc := e.accepted.Load()
	var processed, in uint64
	for _, s := range e.shards {
		processed += s.C.Processed.Load()
		in += s.C.MsgsIn.Load()
	}
	var recv uint64
	for _, s := range e.shards {
		recv += s.C.MsgsRecv.Load()
		if s.C.Held.Load() != 0 || s.C.Partial.Load() != 0 {
			return false
		}
	}
	return processed == acc && in == recv
}

// Close stops accepting events and roots, waits for producers inside Submit
// to return, drains every queued event and message, and stops the workers.
// Roots still monitored stay hooked in the guests' protection until the
// backend drops them. Close is idempotent.
func (e *Engine) Close() error {
	e.closeOnce.Do(func() {
		e.closed.Store(true)
		for e.active.Load() != 0 {
			time.Sleep(10 * time.Microsecond)
		}
		_ = e.Sync(context.Background())
		for _, s := range e.shards {
			s.Stop()
		}
		close(e.stopped)
	})
	return nil
}

// Dump returns the tables of r from every shard, highest level first.
func (e *Engine) Dump(r *vasmon.Root) []vasmon.TableInfo {
	var mu sync.Mutex
	var all []vasmon.TableInfo
	var wg sync.WaitGroup
	for _, s := range e.shards {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.Run(func(st *vasmon.Store) {
				part := st.Dump(r, nil)
				mu.Lock()
				all = append(all, part...)
				mu.Unlock()
			})
		}()
	}
	wg.Wait()
	vasmon.SortTables(all)
	return all
}
