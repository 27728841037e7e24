package shard

import (
	"math/bits"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vasengine/vasengine/vasmon"
)

// Sink is what a shard needs from the engine that holds it.
type Sink interface {
	// Route returns the shard that owns guest page gpa of vm.
	Route(vm *vasmon.VM, gpa uint64) *Shard
	// Ticket returns the synchronous submission of handle h (not 0).
	Ticket(h uint16) *Ticket
	// Panic is told of a recovered callback panic.
	Panic(r *vasmon.Root, v any)
	// Settled is told when r has no structural request in flight any more.
	Settled(r *vasmon.Root)
	// SlotEpoch counts the reuses of VM slots; SlotGen returns a slot's
	// generation (see Shard.Step).
	SlotEpoch() uint64
	SlotGen(slot uint16) uint32
}

// Config configures one shard.
type Config struct {
	ID         int
	CPU        int // host CPU to pin the worker to; -1 leaves it unpinned
	QueueDepth int // ingest queue capacity (rounded up to a power of two)
	MaxBatch   int // most events drained per batch
	Budget     time.Duration
	MaxSlots   int // per-VM counter slots
	// Spin is how long an idle worker polls its queue before it parks
	// (0: 50 us; negative: park at once).
	Spin time.Duration
	// PendingTimeout ends a partial write whose first chunk was trapped
	// this long before a later event of the shard (vasmon).
	PendingTimeout time.Duration
	// Flood is the store's write-flood policy (vasmon.FloodPolicy).
	Flood vasmon.FloodPolicy
	// HoldClock times a partial write that a synchronous event starts
	// from when the shard processes it (Now; vasmon.Write.Held), not from
	// its trap: its vCPU was held until then. Off, expiry runs on trap
	// times alone (a deterministic scheduler's virtual clock).
	HoldClock bool
}

// Counters of one shard, readable at any time. They are published by the
// shard's owner after each step.
type Counters struct {
	Kinds       [len(kindNames)]atomic.Uint64 // events by vasmon.WriteKind
	Processed   atomic.Uint64                 // events processed (each part of a split store)
	Callbacks   atomic.Uint64
	OverBudget  atomic.Uint64
	Panics      atomic.Uint64
	MsgsIn      atomic.Uint64 // control messages executed
	MsgsRecv    atomic.Uint64 // control messages received
	Deferred    atomic.Uint64 // hooks held behind in-flight unhooks
	Dropped     atomic.Uint64 // hooks dropped before they left: their parent entry changed meanwhile
	Held        atomic.Int64  // hooks held now
	Retrying    atomic.Int64  // hooks to run again (guest memory changed under their read)
	Dirty       atomic.Int64  // pages to read again
	Partial     atomic.Int64  // entry writes in progress now
	Expired     atomic.Uint64 // partial writes completed after PendingTimeout
	Misses      atomic.Uint64 // unhooks of tables not hooked here
	StaleWrites atomic.Uint64 // writes already in their page's read, dropped
	StaleReads  atomic.Uint64 // tables not linked where guest memory was read: not hooked or unhooked early
	Resyncs     atomic.Uint64 // pages read again
	// Proofs counts written values proven on guest memory (a read);
	// StampProofs those proven by their store's stamp alone.
	Proofs, StampProofs atomic.Uint64
	Hooks               atomic.Uint64 // tables hooked here
	Unhooks             atomic.Uint64 // tables unhooked here
	Batches             atomic.Uint64
	BatchSum            atomic.Uint64
	Steals              atomic.Uint64 // steps run by another thread than the shard's worker
	SpinNs              atomic.Int64  // time the worker spent polling its idle queue, ns
	Floods              atomic.Uint64 // pages found flooded (vasmon.FloodPolicy)
	Polls               atomic.Uint64 // reads of flooded pages
	Polled              atomic.Int64  // pages flooded now
}

var kindNames = [...]string{"untracked", "irrelevant", "partial", "duplicate", "relevant"}

// VMCounters are per-VM event counts by kind, callbacks, callbacks over the
// latency budget and a coarse latency histogram (VMLatency buckets), summed
// over shards by the engine. Gen is the slot generation they count for.
type VMCounters struct {
	Gen        atomic.Uint32
	Kinds      [len(kindNames)]atomic.Uint64
	Callbacks  atomic.Uint64
	OverBudget atomic.Uint64
	Latency    [VMLatencyBuckets]atomic.Uint64
}

// VMLatencyBuckets is the size of the per-VM latency histograms: bucket k
// counts latencies in [2^(k-1), 2^k) ns (bucket 0: 0 ns), so a per-VM
// quantile is known within a factor of two.
const VMLatencyBuckets = 64

// VMLatencyBucket returns the per-VM histogram bucket of ns.
func VMLatencyBucket(ns int64) int { return bits.Len64(uint64(max(ns, 0))) }

// vmLocal is the owner's plain copy of one VMCounters.
type vmLocal struct {
	kinds                 [len(kindNames)]uint64
	callbacks, overBudget uint64
	latency               [VMLatencyBuckets]uint64
	changed               uint64 // latency buckets changed since the last publish
	gen                   uint32
}

// local are the counters the owner updates with plain arithmetic on the
// event path; publishCounters copies them into the atomic Counters and
// VMCounters after each step, so readers see them at most one step late.
type local struct {
	kinds           [len(kindNames)]uint64
	callbacks, over uint64
	processed       uint64
	vm              []vmLocal
	dirty           []uint32 // VM slots changed since the last publish
	isDirty         []bool
	dequeued        []int32  // events per slot in the current batch
	inBatch         []uint16 // slots with events in the current batch
	epoch           uint64   // the sink's SlotEpoch last seen

	// Callbacks invoked but not yet timed (see timeCallbacks).
	untimed   [maxTimedGroup]untimed
	nuntimed  int
	group     int   // callbacks timed by one clock read now: 1 or maxTimedGroup
	lastTimed int64 // Now() of the last clock read
}

// untimed is a callback whose latency is not yet recorded.
type untimed struct {
	trap int64
	slot uint32 // VM counter slot; past the slots if none
}

const (
	// maxTimedGroup is how many fast callbacks one clock read times.
	maxTimedGroup = 16
	// slowCallbacks is the time per callback, over the last group, from
	// which every callback gets its own clock read.
	slowCallbacks = 500 * time.Nanosecond
	// maxCalls is how many callbacks a step buffers before invoking them,
	// so a huge unhook (an alias bomb stopped) costs bounded memory.
	maxCalls = 4096
)

// Shard owns the table nodes of the guest pages routed to it (a
// vasmon.Store) and the work that reaches them: an ingest queue of events
// and an inbox of control messages, which any goroutine may fill at any
// time.
//
// Its state is touched only by its owner: whoever holds its ownership
// token (TryAcquire, Release) and runs its steps (Step). The token is
// usually held by the shard's worker goroutine (Start), but any thread may
// take it when it is free and run a bounded step: a submitter that wants
// its write processed before it returns, or an idle worker of another shard
// when this one's worker is not running. A holder that releases the token
// with work left wakes the worker, so no work waits for a thread that will
// not come.
type Shard struct {
	cfg  Config
	q    *Ring[Event]
	sink Sink

	mu      sync.Mutex
	inbox   []Msg
	spare   []Msg
	pending atomic.Int64 // messages in the inbox

	owner atomic.Int32 // 0: free; 1: held

	spaceMu      sync.Mutex
	spaceCond    sync.Cond // on spaceMu: the queue has room again
	spaceWaiters atomic.Int32

	// The worker goroutine.
	wake     chan struct{}
	sleeping atomic.Bool
	quit     atomic.Bool
	done     chan struct{}
	started  bool
	tid      atomic.Int64 // OS thread holding the token, 0 if none (re-entrancy checks)
	beat     atomic.Int64 // Now() when the worker last ran (its peers take over a shard whose worker stalls)
	pinned   atomic.Int32 // the CPU the worker is pinned to, -1 if none

	// Owned state.
	store     *vasmon.Store
	out       vasmon.Output
	held      []Msg // hooks held behind unhooks of their root
	spareHeld []Msg
	retry     []Msg // hooks to run again (vasmon.Unsure)
	blocked   []*vasmon.Root
	called    int // calls of out already invoked
	loc       local
	lhist     *LocalHist
	cur       uint16 // ticket of the work being done (verdicts)
	steps     uint64

	// queued counts each VM slot's events in the queue (fair ingest: the
	// engine holds a VM back once it has more than its share queued and
	// the queue is half full).
	queued []atomic.Int32

	Hist   Histogram // callback latencies, published after each step
	C      Counters
	VMs    []VMCounters
	PinErr error // why pinning failed, if it did (set before Start returns)
	tables atomic.Int64
	bytes  atomic.Int64
}

// New returns a shard. Start runs a worker goroutine for it; without one,
// the shard runs only when a caller steps it (a deterministic scheduler).
func New(cfg Config, sink Sink) *Shard {
	if cfg.QueueDepth <= 0 {
		cfg.QueueDepth = 1 << 14
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 256
	}
	if cfg.MaxSlots <= 0 {
		cfg.MaxSlots = 1024
	}
	if cfg.Spin == 0 {
		cfg.Spin = 50 * time.Microsecond
	}
	st := vasmon.NewStore()
	st.PendingTimeout = int64(cfg.PendingTimeout)
	st.Flood = cfg.Flood
	s := &Shard{cfg: cfg, q: NewRing[Event](cfg.QueueDepth), sink: sink, store: st,
		wake: make(chan struct{}, 1), done: make(chan struct{}),
		VMs: make([]VMCounters, cfg.MaxSlots), lhist: NewLocalHist(), queued: make([]atomic.Int32, cfg.MaxSlots),
		loc: local{group: 1, vm: make([]vmLocal, cfg.MaxSlots), dirty: make([]uint32, 0, cfg.MaxSlots),
			isDirty: make([]bool, cfg.MaxSlots), dequeued: make([]int32, cfg.MaxSlots), inBatch: make([]uint16, 0, cfg.MaxSlots)}}
	s.spaceCond.L = &s.spaceMu
	s.pinned.Store(-1)
	return s
}

// ID returns the shard's index.
func (s *Shard) ID() int { return s.cfg.ID }

// CPU returns the host CPU the shard's worker is pinned to, or -1.
func (s *Shard) CPU() int { return int(s.pinned.Load()) }

// QueueLen returns the number of queued events (approximate).
func (s *Shard) QueueLen() int { return s.q.Len() }

// QueueCap returns the ingest queue's capacity.
func (s *Shard) QueueCap() int { return s.q.Cap() }

// Tables returns the number of tables hooked in this shard, as of its last step.
func (s *Shard) Tables() int64 { return s.tables.Load() }

// HostBytes returns the host memory of the shard's store, as of its last step.
func (s *Shard) HostBytes() int64 { return s.bytes.Load() }

// Processed returns how many events the shard has processed.
func (s *Shard) Processed() uint64 { return s.C.Processed.Load() }

// Position returns the ingest queue position up to which events have been
// claimed for processing.
func (s *Shard) Position() uint64 { return s.q.head.Load() }

// Queued returns how many events of VM slot are in the queue (about).
func (s *Shard) Queued(slot uint16) int32 { return s.queued[slot].Load() }

// AddQueued counts n events of VM slot queued (the engine, after it queued
// them).
func (s *Shard) AddQueued(slot uint16, n int) { s.queued[slot].Add(int32(n)) }

// HasWork reports whether the shard has events or messages waiting.
func (s *Shard) HasWork() bool { return s.q.Len() > 0 || s.pending.Load() > 0 }

// Busy reports whether the shard has anything not yet done: events or
// messages waiting, hooks held or to run again, pages to read again or
// partial writes pending.
func (s *Shard) Busy() bool {
	return s.HasWork() || s.C.Held.Load() != 0 || s.C.Retrying.Load() != 0 || s.C.Dirty.Load() != 0 || s.C.Partial.Load() != 0
}

// WaitSpace blocks while the queue is more than half full. A producer that
// found the queue full calls it instead of sleeping: the worker wakes it
// once it has drained the queue to half (so producers and the worker do
// not take turns batch by batch). It does not allocate.
func (s *Shard) WaitSpace() {
	s.spaceMu.Lock()
	s.spaceWaiters.Add(1)
	for s.q.Len() > s.q.Cap()/2 && !s.quit.Load() {
		s.spaceCond.Wait()
	}
	s.spaceWaiters.Add(-1)
	s.spaceMu.Unlock()
}

func (s *Shard) wakeSpaceWaiters() {
	if s.spaceWaiters.Load() > 0 && s.q.Len() <= s.q.Cap()/2 {
		s.spaceMu.Lock()
		s.spaceCond.Broadcast()
		s.spaceMu.Unlock()
	}
}

// TryEnqueue queues one event; it returns false if the queue is full.
func (s *Shard) TryEnqueue(e *Event) bool {
	if !s.q.TryEnqueue(*e) {
		return false
	}
	s.notify()
	return true
}

// TryEnqueueBatch queues a prefix of evs in one run and returns its length
// (0 if the queue is full) and the queue position of its first event.
func (s *Shard) TryEnqueueBatch(evs []Event) (int, uint64) {
	n, pos := s.q.tryEnqueueBatch(evs)
	if n > 0 {
		s.notify()
	}
	return n, pos
}

// notify wakes the worker if it is parked.
func (s *Shard) notify() {
	if s.sleeping.Load() {
		s.signal()
	}
}

func (s *Shard) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Send queues a control message. It never blocks on the receiver.
func (s *Shard) Send(m Msg) {
	s.C.MsgsRecv.Add(1)
	s.mu.Lock()
	s.inbox = append(s.inbox, m)
	s.mu.Unlock()
	s.pending.Add(1)
	s.signal()
}

// TryAcquire takes the shard's ownership token if it is free.
func (s *Shard) TryAcquire() bool {
	if s.owner.Load() != 0 || !s.owner.CompareAndSwap(0, 1) {
		return false
	}
	return true
}

// Release gives the ownership token back. If work is waiting, the worker is
// woken to do it.
func (s *Shard) Release() {
	left := len(s.held) > 0 || len(s.retry) > 0 // (read while still the owner)
	s.owner.Store(0)
	if left || s.HasWork() {
		s.signal()
	}
}

// Held reports whether some thread holds the ownership token.
func (s *Shard) Held() bool { return s.owner.Load() != 0 }

// SetOwnerThread records the OS thread id of the token's holder (0 when it
// releases it), for re-entrancy checks.
func (s *Shard) SetOwnerThread(tid int64) { s.tid.Store(tid) }

// OwnerThread returns the OS thread id recorded by SetOwnerThread.
func (s *Shard) OwnerThread() int64 { return s.tid.Load() }

// Step runs one bounded unit of the shard's work and reports whether it did
// anything. The caller must hold the ownership token. A step executes the
// messages in the inbox, lets held hooks go whose root has no unhook in
// flight, processes up to max events (MaxBatch if max is 0), and, when it
// found nothing else to do, runs again the work guest memory made unsure.
// It publishes the counters before it returns.
func (s *Shard) Step(max int) bool {
	if max <= 0 {
		max = s.cfg.MaxBatch
	}
	s.steps++
	worked := false
	if e := s.sink.SlotEpoch(); e != s.loc.epoch {
		// (Before messages too: their callbacks count for the VM's slot.)
		s.loc.epoch = e
		s.newSlots()
	}
	if s.pending.Load() > 0 {
		s.drainInbox()
		worked = true
	}
	if len(s.held) > 0 && s.release() {
		worked = true
	}
	if pos, n := s.q.Claim(max); n > 0 {
		if e := s.sink.SlotEpoch(); e != s.loc.epoch {
			s.loc.epoch = e
			s.newSlots()
		}
		l := &s.loc
		for i := range uint64(n) {
			e := s.q.At(pos + i)
			if int(e.Slot) < len(l.dequeued) {
				if l.dequeued[e.Slot] == 0 {
					l.inBatch = append(l.inBatch, e.Slot)
				}
				l.dequeued[e.Slot]++
			}
			s.process(e)
		}
		s.q.Release(pos, n)
		for _, slot := range l.inBatch {
			s.queued[slot].Add(-l.dequeued[slot])
			l.dequeued[slot] = 0
		}
		l.inBatch = l.inBatch[:0]
		s.wakeSpaceWaiters()
		s.C.Batches.Add(1)
		s.C.BatchSum.Add(uint64(n))
		s.loc.processed += uint64(n)
		worked = true
	} else if !worked && (len(s.retry) > 0 || s.store.Dirty() > 0) {
		worked = s.retryWork()
	}
	s.publish()
	return worked
}

// Flush brings the shard to a quiescent point (vasmon.Store.Flush): partial
// writes end and pages whose read was given up are read again, with the
// structural requests and callbacks that produces. The caller must hold the
// ownership token.
func (s *Shard) Flush() {
	s.out.Reset()
	s.called = 0
	s.cur = 0
	s.store.Flush(&s.out)
	s.finish(Now(), 0)
	s.retryWork()
	s.publish()
}

// Dump appends the tables of r held by this shard to dst. The caller must
// hold the ownership token.
func (s *Shard) Dump(r *vasmon.Root, dst []vasmon.TableInfo) []vasmon.TableInfo {
	return s.store.Dump(r, dst)
}

// newSlots resets the plain counters of VM slots reused since the last
// step (their generation changed), and their published counters.
func (s *Shard) newSlots() {
	for slot := range s.loc.vm {
		g := s.sink.SlotGen(uint16(slot))
		v := &s.loc.vm[slot]
		if v.gen == g {
			continue
		}
		*v = vmLocal{gen: g, changed: ^uint64(0)}
		c := &s.VMs[slot]
		for k := range c.Kinds {
			c.Kinds[k].Store(0)
		}
		c.Callbacks.Store(0)
		c.OverBudget.Store(0)
		for b := range c.Latency {
			c.Latency[b].Store(0)
		}
		c.Gen.Store(g)
		s.markDirty(uint32(slot))
	}
}

func (s *Shard) publish() {
	s.publishCounters()
	st := s.store.Stats()
	s.C.Partial.Store(int64(s.store.Pending()))
	s.C.Dirty.Store(int64(st.Dirty))
	s.C.Retrying.Store(int64(len(s.retry)))
	s.C.Held.Store(int64(len(s.held)))
	s.C.Expired.Store(st.ExpiredPartial)
	s.C.Misses.Store(st.UnhookMisses)
	s.C.StaleWrites.Store(st.StaleWrites)
	s.C.StaleReads.Store(st.StaleReads)
	s.C.Resyncs.Store(st.Resyncs)
	s.C.Proofs.Store(st.Proofs)
	s.C.StampProofs.Store(st.StampProofs)
	s.C.Floods.Store(st.Floods)
	s.C.Polls.Store(st.Polls)
	s.C.Polled.Store(int64(st.Polled))
	s.C.Hooks.Store(st.Hooks)
	s.C.Unhooks.Store(st.Unhooks)
	s.tables.Store(int64(st.Tables))
	s.bytes.Store(int64(s.store.HostBytes()))
	// Last: Engine.Sync reads it first.
	s.C.Processed.Store(s.loc.processed)
}

func (s *Shard) drainInbox() {
	s.mu.Lock()
	msgs := s.inbox
	s.inbox = s.spare[:0]
	s.mu.Unlock()
	for i := range msgs {
		m := &msgs[i]
		s.out.Reset()
		s.called = 0
		s.cur = m.Ticket
		switch m.Op {
		case MsgFlush:
			if r := m.Req.Root; r != nil {
				s.store.FlushRoot(r, &s.out)
			} else {
				s.store.Flush(&s.out)
			}
			s.finish(m.Trap, m.Ticket)
		case MsgReq:
			if s.store.Exec(&m.Req, &s.out) == vasmon.Unsure {
				// Run again later, still in flight.
				s.retry = append(s.retry, *m)
				s.finish(m.Trap, m.Ticket)
				s.pending.Add(-1)
				s.C.MsgsIn.Add(1)
				*m = Msg{}
				continue
			}
			s.finish(m.Trap, m.Ticket)
			s.settle(&m.Req, m.Ticket)
		}
		s.pending.Add(-1)
		s.C.MsgsIn.Add(1)
		*m = Msg{}
	}
	s.out.Trim()
	s.mu.Lock()
	s.spare = msgs[:0]
	s.mu.Unlock()
}

// settle ends a structural request that was in flight (sent, held or run
// again).
func (s *Shard) settle(req *vasmon.Request, ticket uint16) {
	rs := StateOf(req.Root)
	if req.Op == vasmon.OpUnhook {
		rs.Unhooks.Add(-1)
	}
	// Only now, so that neither the root's waiter nor Engine.Sync sees
	// the work as done before what it caused is counted (the tables hooked
	// included: Stats after Stop says none).
	s.publishCounters()
	s.tables.Store(int64(s.store.Tables()))
	if rs.InFlight.Add(-1) == 0 {
		s.sink.Settled(req.Root)
	}
	if ticket != 0 {
		s.sink.Ticket(ticket).Done()
	}
}

func (s *Shard) process(e *Event) {
	w := vasmon.Write{GPA: e.GPA, Data: e.Data, Old: e.Old, RIP: e.RIP, Size: e.Size, HasOld: e.HasOld, Trap: e.Trap,
		Ver: e.Ver, Ver2: e.Ver2, Stamped: e.Stamped}
	if e.Ticket != 0 && s.cfg.HoldClock {
		w.Held = Now()
	}
	s.out.Reset()
	s.called = 0
	s.cur = e.Ticket
	k := s.store.Write(vasmon.VMID(e.Slot), &w, &s.out)
	s.loc.kinds[k]++
	if int(e.Slot) < len(s.VMs) {
		s.loc.vm[e.Slot].kinds[k]++
		s.markDirty(uint32(e.Slot))
	}
	if len(s.out.Reqs) > 0 || len(s.out.Calls) > 0 {
		s.finish(e.Trap, e.Ticket)
	}
	if e.Ticket != 0 {
		s.publishCounters()
		s.sink.Ticket(e.Ticket).Done()
	}
}

// finish dispatches the structural requests in s.out and invokes the
// callbacks, bounded: first every unhook and drop notice (with those their
// local execution adds), then the callbacks so far (the leaf changes and
// the removals), and only then the hooks, whose additions follow; again
// while requests remain.
func (s *Shard) finish(trap int64, ticket uint16) {
	for {
		progress := false
		for i := 0; i < len(s.out.Reqs); i++ {
			if op := s.out.Reqs[i].Op; op == vasmon.OpUnhook || op == vasmon.OpDropped {
				req := s.out.Reqs[i]
				s.out.Reqs[i].Op = 0
				s.dispatch(&req, trap, ticket)
				progress = true
				s.invokeIfFull(trap)
			}
		}
		s.invoke(trap)
	hooks:
		for i := 0; i < len(s.out.Reqs); i++ {
			if s.out.Reqs[i].Op == vasmon.OpHook {
				req := s.out.Reqs[i]
				s.out.Reqs[i].Op = 0
				n := len(s.out.Reqs)
				s.dispatch(&req, trap, ticket)
				progress = true
				s.invokeIfFull(trap)
				for _, q := range s.out.Reqs[n:] {
					if q.Op != vasmon.OpHook {
						// Its local execution read a page again, which
						// unhooked tables: those go first.
						break hooks
					}
				}
			}
		}
		s.invoke(trap)
		if !progress {
			break
		}
	}
	s.out.Reqs = s.out.Reqs[:0]
}

// invokeIfFull invokes the buffered callbacks when there are maxCalls.
func (s *Shard) invokeIfFull(trap int64) {
	if len(s.out.Calls)-s.called >= maxCalls {
		s.invoke(trap)
	}
}

// invoke invokes the callbacks not invoked yet, in order, and empties the
// buffer.
func (s *Shard) invoke(trap int64) {
	n := len(s.out.Calls)
	if s.called == n {
		return
	}
	l := &s.loc
	for i := s.called; i < n; i++ {
		c := &s.out.Calls[i]
		l.untimed[l.nuntimed] = untimed{trap: trap, slot: c.Root.VM.Slot}
		l.nuntimed++
		if l.group == 1 {
			s.timeCallbacks() // slow callbacks: timed exactly, as they start
			s.call(c, trap)
			continue
		}
		s.call(c, trap)
		if l.nuntimed >= l.group {
			s.timeCallbacks()
		}
	}
	l.callbacks += uint64(n - s.called)
	s.out.Calls = s.out.Calls[:0]
	s.called = 0
}

// dispatch executes a request here if this shard owns its page, sends it
// otherwise, or holds it back. A hook leaves only while its parent (in this
// store: the step that emitted it ran here) still links it; it waits while
// unhooks of its root are in flight anywhere, and behind the root's hooks
// already held here, so that an unlinked subtree's removals are reported
// before a newly linked subtree's additions at the same addresses. Unhooks
// and drop notices never wait, so held hooks are eventually released.
func (s *Shard) dispatch(req *vasmon.Request, trap int64, ticket uint16) {
	r := req.Root
	rs := StateOf(r)
	if req.Op == vasmon.OpHook {
		if !s.store.Linked(req) {
			vasmon.Dropped(req)
			s.C.Dropped.Add(1)
			return
		}
		if rs.Unhooks.Load() > 0 || s.holds(r) {
			rs.InFlight.Add(1)
			s.addTicket(ticket)
			s.held = append(s.held, Msg{Req: *req, Trap: trap, Ticket: ticket})
			s.C.Deferred.Add(1)
			return
		}
	}
	s.route(req, trap, ticket)
}

// route executes req here or sends it to the shard that owns its page.
func (s *Shard) route(req *vasmon.Request, trap int64, ticket uint16) {
	rs := StateOf(req.Root)
	owner := s.sink.Route(req.Root.VM, req.Page())
	if owner == s {
		if s.store.Exec(req, &s.out) == vasmon.Unsure {
			rs.InFlight.Add(1)
			s.addTicket(ticket)
			s.retry = append(s.retry, Msg{Req: *req, Trap: trap, Ticket: ticket})
		}
		return
	}
	rs.InFlight.Add(1)
	if req.Op == vasmon.OpUnhook {
		rs.Unhooks.Add(1)
	}
	s.addTicket(ticket)
	owner.Send(Msg{Req: *req, Trap: trap, Ticket: ticket})
}

func (s *Shard) addTicket(ticket uint16) {
	if ticket != 0 {
		s.sink.Ticket(ticket).Add(1)
	}
}

func (s *Shard) holds(r *vasmon.Root) bool {
	for i := range s.held {
		if s.held[i].Req.Root == r {
			return true
		}
	}
	return false
}

// release lets held hooks go, in order per root, once their root has no
// unhook in flight. A hook whose parent was unhooked or re-pointed since is
// dropped. It reports whether it let any go.
func (s *Shard) release() bool {
	held := s.held
	s.held = s.spareHeld[:0]
	blocked := s.blocked[:0]
	went := false
	for i := range held {
		m := held[i]
		r := m.Req.Root
		stop := false
		for _, b := range blocked {
			stop = stop || b == r
		}
		if !stop && StateOf(r).Unhooks.Load() > 0 {
			blocked = append(blocked, r)
			stop = true
		}
		if stop {
			s.held = append(s.held, m)
			continue
		}
		went = true
		s.out.Reset()
		s.called = 0
		s.cur = m.Ticket
		if !s.store.Linked(&m.Req) {
			vasmon.Dropped(&m.Req)
			s.C.Dropped.Add(1)
		} else {
			s.route(&m.Req, m.Trap, m.Ticket)
			s.finish(m.Trap, m.Ticket)
		}
		s.settle(&m.Req, m.Ticket)
	}
	clear(held)
	s.spareHeld = held[:0]
	clear(blocked)
	s.blocked = blocked[:0]
	return went
}

// retryWork runs again the hooks and the page reads that guest memory made
// unsure, and reports whether any of them was done.
func (s *Shard) retryWork() bool {
	did := false
	if n := len(s.retry); n > 0 {
		todo := s.retry
		s.retry = make([]Msg, 0, n)
		for i := range todo {
			m := &todo[i]
			s.out.Reset()
			s.called = 0
			s.cur = m.Ticket
			if s.store.Exec(&m.Req, &s.out) == vasmon.Unsure {
				s.retry = append(s.retry, *m)
				s.finish(m.Trap, m.Ticket)
				continue
			}
			did = true
			s.finish(m.Trap, m.Ticket)
			s.settle(&m.Req, m.Ticket)
		}
	}
	if d := s.store.Dirty(); d > 0 {
		s.out.Reset()
		s.called = 0
		s.cur = 0
		if s.store.Retry(&s.out) < d {
			did = true
		}
		s.finish(Now(), 0)
	}
	return did
}

// call invokes one callback, recovering a panic, and records a Deny verdict
// of a synchronous write's callback in its ticket.
func (s *Shard) call(c *vasmon.Call, trap int64) {
	defer func() {
		if v := recover(); v != nil {
			s.C.Panics.Add(1)
			s.sink.Panic(c.Root, v)
		}
	}()
	if f := StateOf(c.Root).Verdict; f != nil {
		if f(c.Root.Ctx, c.VA, c.Old, c.New, c.Size) == Deny && s.cur != 0 {
			s.sink.Ticket(s.cur).Deny()
		}
		return
	}
	if f := StateOf(c.Root).Traced; f != nil {
		f(c.Root.Ctx, c.VA, c.Old, c.New, c.Size, trap)
		return
	}
	c.Root.Callback(c.Root.Ctx, c.VA, c.Old, c.New, c.Size)
}

// timeCallbacks records the latency of the callbacks invoked (or about to
// be) since the last clock read, all with one read taken now.
//
// While callbacks are fast, a group of up to maxTimedGroup is timed after
// they ran: a callback's latency is never under-stated, and over-stated by
// at most the time its group took (about 100 ns per nop callback and event
// here, so under 3 us). Once the callbacks of a group took slowCallbacks or
// more each, or after a pause, every callback is timed on its own, exactly,
// as it starts, until they are fast again (a group that turns slow is
// over-stated by up to its whole duration, once). A group ends with every
// step, so no idle time falls inside it. Reading the clock costs about 30
// ns on the project's machine (kvm-clock): once per callback it was a sixth
// of the worker's time per event.
func (s *Shard) timeCallbacks() {
	l := &s.loc
	if l.nuntimed == 0 {
		return
	}
	now := Now()
	if l.lastTimed == 0 || now-l.lastTimed > int64(l.nuntimed)*int64(slowCallbacks) {
		l.group = 1
	} else {
		l.group = maxTimedGroup
	}
	l.lastTimed = now
	for _, u := range l.untimed[:l.nuntimed] {
		lat := now - u.trap
		over := s.cfg.Budget > 0 && lat > int64(s.cfg.Budget)
		s.lhist.Record(lat)
		if over {
			l.over++
		}
		if int(u.slot) < len(s.VMs) {
			bucket := VMLatencyBucket(lat)
			v := &l.vm[u.slot]
			v.callbacks++
			v.latency[bucket]++
			v.changed |= 1 << bucket
			if over {
				v.overBudget++
			}
			s.markDirty(u.slot)
		}
	}
	l.nuntimed = 0
}

func (s *Shard) markDirty(slot uint32) {
	if !s.loc.isDirty[slot] {
		s.loc.isDirty[slot] = true
		s.loc.dirty = append(s.loc.dirty, slot)
	}
}

// publishCounters copies the owner's plain counters into the atomics.
func (s *Shard) publishCounters() {
	s.timeCallbacks()
	l := &s.loc
	for k, v := range l.kinds {
		s.C.Kinds[k].Store(v)
	}
	s.lhist.PublishTo(&s.Hist)
	s.C.Callbacks.Store(l.callbacks)
	s.C.OverBudget.Store(l.over)
	for _, slot := range l.dirty {
		c, v := &s.VMs[slot], &l.vm[slot]
		for k := range c.Kinds {
			c.Kinds[k].Store(v.kinds[k])
		}
		c.Callbacks.Store(v.callbacks)
		c.OverBudget.Store(v.overBudget)
		for m := v.changed; m != 0; m &= m - 1 {
			b := bits.TrailingZeros64(m)
			c.Latency[b].Store(v.latency[b])
		}
		v.changed = 0
		l.isDirty[slot] = false
	}
	l.dirty = l.dirty[:0]
}
