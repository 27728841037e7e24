package shard

import (
	"fmt"
	"math/bits"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vasengine/vasengine/vasmon"
)

// Event is one trapped page-table write as a backend submits it. It is a
// fixed-size, pointer-free record of 56 bytes (a queue slot with its
// sequence number fills one 64-byte cache line), so queues of events cost
// the garbage collector nothing.
type Event struct {
	GPA  uint64 // first byte written
	Data uint64 // bytes written, little-endian
	Old  uint64 // whole entry before the write, if HasOld
	RIP  uint64 // writer's instruction pointer, 0 if unknown
	Trap int64  // when the trap was observed, in Now() nanoseconds
	// Seen is a Now() time taken after the write was applied to guest
	// memory: the backend's, if it knows one (the earlier the better), or
	// else the engine's, when Submit received the event. A write seen
	// before its page was read by a hook is dropped as already in the read
	// (vasmon.Write.Seen), so a Seen earlier than the write would lose it.
	Seen int64
	VM   uint32
	Slot uint16 // dense per-VM counter slot (set by the engine)
	Size uint8
	// HasOld says Old was read from guest memory just before the write.
	HasOld bool
}

var epoch = time.Now()

// Now returns the monotonic time used for trap timestamps, in nanoseconds.
// It does not allocate.
func Now() int64 { return int64(time.Since(epoch)) }

// Msg is a control message between shards: a structural request for a table
// this shard owns, or a function to run on the shard's goroutine (dumps,
// snapshots). Control messages are rare and go through a small mutex-guarded
// inbox that never blocks its sender, so shards cannot deadlock on each
// other.
type Msg struct {
	Req  vasmon.Request
	Trap int64
	Fn   func(*vasmon.Store)
}

// Sink receives what a shard reports beyond its counters.
type Sink interface {
	// Route returns the shard that owns guest page gpa of vm.
	Route(vm vasmon.VMID, gpa uint64) *Shard
	// Panic is told of a recovered callback panic.
	Panic(r *vasmon.Root, v any)
	// Settled is told when r has no structural request in flight any more.
	Settled(r *vasmon.Root)
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
	// PendingTimeout completes an entry write left half-done for this long
	// with the entry's value in guest memory (vasmon.Store.ExpirePending).
	PendingTimeout time.Duration
}

// Counters of one shard, readable at any time.
type Counters struct {
	Kinds      [len(kindNames)]atomic.Uint64 // events by vasmon.WriteKind
	Processed  atomic.Uint64
	Callbacks  atomic.Uint64
	OverBudget atomic.Uint64
	Panics     atomic.Uint64
	MsgsIn     atomic.Uint64 // control messages executed
	MsgsRecv   atomic.Uint64 // control messages received
	Deferred   atomic.Uint64 // hooks held behind in-flight unhooks
	Dropped    atomic.Uint64 // held hooks dropped: their parent entry changed meanwhile
	Held       atomic.Int64  // hooks held now
	Partial    atomic.Int64  // entry writes in progress now
	Expired    atomic.Uint64 // entry writes completed from guest memory after PendingTimeout
	Supersedes atomic.Uint64 // hooks that found a table at the same place (store statistic)
	Misses     atomic.Uint64 // unhooks of tables not hooked here (store statistic)
	Stale      atomic.Uint64 // page writes seen before a hook read the page: already in the read, dropped
	Hooks      atomic.Uint64 // tables hooked here (store statistic)
	Unhooks    atomic.Uint64 // tables unhooked here (store statistic)
	Batches    atomic.Uint64
	BatchSum   atomic.Uint64
}

var kindNames = [...]string{"untracked", "irrelevant", "partial", "duplicate", "relevant"}

// VMCounters are per-VM event counts by kind, callbacks, callbacks over the
// latency budget and a coarse latency histogram (VMLatency buckets), summed
// over shards by the engine.
type VMCounters struct {
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

// vmLocal is the worker's plain copy of one VMCounters.
type vmLocal struct {
	kinds                 [len(kindNames)]uint64
	callbacks, overBudget uint64
	latency               [VMLatencyBuckets]uint64
	changed               uint64 // latency buckets changed since the last publish
}

// local are the counters the worker updates with plain arithmetic on the
// event path; publishCounters copies them into the atomic Counters and
// VMCounters after each batch, so readers see them at most one batch late.
type local struct {
	kinds           [len(kindNames)]uint64
	callbacks, over uint64
	vm              []vmLocal
	dirty           []uint32 // VM slots changed since the last publish
	isDirty         []bool

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
)

// Shard owns the table nodes of the guest pages routed to it: its Store is
// touched only by its worker goroutine. Producers call Enqueue from any
// goroutine; other shards call Send.
type Shard struct {
	cfg   Config
	q     *Ring[Event]
	sink  Sink
	store *vasmon.Store

	spaceMu      sync.Mutex
	spaceCond    sync.Cond // on spaceMu: the queue has room again
	spaceWaiters atomic.Int32
	runMu        sync.Mutex // serializes Run once the worker has stopped
	out          vasmon.Output

	mu      sync.Mutex
	inbox   []Msg
	spare   []Msg
	pending atomic.Int64 // messages in the inbox

	wake     chan struct{}
	sleeping atomic.Bool
	quit     atomic.Bool
	done     chan struct{}

	deferred      []Msg // held hooks (see dispatch)
	spareDeferred []Msg
	blocked       []*vasmon.Root

	loc   local
	lhist *LocalHist

	Hist   Histogram // callback latencies, published after each batch
	C      Counters
	VMs    []VMCounters
	PinErr error // why pinning failed, if it did (set before Start returns)
	tables atomic.Int64
	bytes  atomic.Int64
}

// New returns a shard; Start runs its worker.
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
	if cfg.PendingTimeout <= 0 {
		cfg.PendingTimeout = time.Millisecond
	}
	st := vasmon.NewStore()
	st.Clock = Now
	s := &Shard{cfg: cfg, q: NewRing[Event](cfg.QueueDepth), sink: sink, store: st,
		wake: make(chan struct{}, 1), done: make(chan struct{}),
		VMs: make([]VMCounters, cfg.MaxSlots), lhist: NewLocalHist(),
		loc: local{group: 1, vm: make([]vmLocal, cfg.MaxSlots), dirty: make([]uint32, 0, cfg.MaxSlots),
			isDirty: make([]bool, cfg.MaxSlots)}}
	s.spaceCond.L = &s.spaceMu
	return s
}

// ID returns the shard's index.
func (s *Shard) ID() int { return s.cfg.ID }

// QueueLen returns the number of queued events (approximate).
func (s *Shard) QueueLen() int { return s.q.Len() }

// QueueCap returns the ingest queue's capacity.
func (s *Shard) QueueCap() int { return s.q.Cap() }

// Tables returns the number of tables hooked in this shard, as of its last batch.
func (s *Shard) Tables() int64 { return s.tables.Load() }

// HostBytes returns the host memory of the shard's store, as of its last batch.
func (s *Shard) HostBytes() int64 { return s.bytes.Load() }

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

// wakeSpaceWaiters wakes the producers in WaitSpace; the worker calls it
// after it dequeued.
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
	if s.sleeping.Load() {
		s.signal()
	}
	return true
}

func (s *Shard) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// TryEnqueueBatch queues a prefix of evs in one run and returns its length
// (0 if the queue is full).
func (s *Shard) TryEnqueueBatch(evs []Event) int {
	n := s.q.TryEnqueueBatch(evs)
	if n > 0 && s.sleeping.Load() {
		s.signal()
	}
	return n
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

// Start runs the worker goroutine. It returns once the worker has tried to
// pin itself; a pinning failure is in PinErr and the worker runs unpinned.
func (s *Shard) Start() {
	ready := make(chan struct{})
	go s.run(ready)
	<-ready
}

// Stop makes the worker exit once its queue and inbox are empty and waits
// for it. Producers must have stopped.
func (s *Shard) Stop() {
	s.quit.Store(true)
	s.spaceMu.Lock()
	s.spaceCond.Broadcast()
	s.spaceMu.Unlock()
	s.signal()
	<-s.done
}

// Idle reports whether the shard has nothing queued or held back.
func (s *Shard) Idle() bool {
	return s.q.Len() == 0 && s.pending.Load() == 0 && s.C.Held.Load() == 0 && s.C.Partial.Load() == 0
}

func (s *Shard) run(ready chan struct{}) {
	defer close(s.done)
	runtime.LockOSThread()
	if s.cfg.CPU >= 0 {
		if err := Pin(s.cfg.CPU); err != nil {
			s.PinErr = fmt.Errorf("shard %d runs unpinned: %w", s.cfg.ID, err)
		}
	}
	close(ready)
	var idleSince int64
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		worked := false
		if s.pending.Load() > 0 {
			s.drainInbox()
			worked = true
		}
		if len(s.deferred) > 0 {
			s.release()
		}
		if pos, n := s.q.Claim(s.cfg.MaxBatch); n > 0 {
			for i := range uint64(n) {
				s.process(s.q.At(pos + i))
			}
			s.q.Release(pos, n)
			s.wakeSpaceWaiters()
			// Publish partial-write state before counting the batch
			// processed: Engine.Sync reads them in the other order.
			s.publish()
			s.publishCounters()
			s.C.Processed.Add(uint64(n))
			s.C.Batches.Add(1)
			s.C.BatchSum.Add(uint64(n))
			idleSince = 0
			continue
		}
		if worked {
			idleSince = 0
			s.publish()
			continue
		}
		if s.C.Partial.Load() > 0 {
			s.publish()
		}
		if s.quit.Load() && s.Idle() {
			return
		}
		// Poll a while before parking: waking a parked, thread-locked
		// worker costs tens of microseconds, more than the latency budget.
		now := Now()
		if idleSince == 0 {
			idleSince = now
		}
		if now-idleSince < int64(s.cfg.Spin) {
			for i := 0; i < 256 && s.q.Len() == 0 && s.pending.Load() == 0; i++ {
			}
			continue
		}
		s.sleeping.Store(true)
		if s.q.Len() == 0 && s.pending.Load() == 0 && !s.quit.Load() {
			d := 10 * time.Millisecond
			switch {
			case len(s.deferred) > 0:
				d = 20 * time.Microsecond // held hooks wait for other shards' unhooks
			case s.C.Partial.Load() > 0:
				d = s.cfg.PendingTimeout
			}
			timer.Reset(d)
			select {
			case <-s.wake:
			case <-timer.C:
			}
			timer.Stop()
		}
		s.sleeping.Store(false)
	}
}

func (s *Shard) publish() {
	if n, oldest := s.store.Pending(); n > 0 {
		if Now()-oldest > int64(s.cfg.PendingTimeout) {
			s.out.Reset()
			k := s.store.ExpirePending(Now()-int64(s.cfg.PendingTimeout), &s.out)
			s.C.Expired.Add(uint64(k))
			s.finish(oldest)
			s.publishCounters()
			n, _ = s.store.Pending()
		}
		s.C.Partial.Store(int64(n))
	} else if s.C.Partial.Load() != 0 {
		s.C.Partial.Store(0)
	}
	st := s.store.Stats()
	s.C.Supersedes.Store(st.Supersedes)
	s.C.Misses.Store(st.UnhookMisses)
	s.C.Stale.Store(st.Stale)
	s.C.Hooks.Store(st.Hooks)
	s.C.Unhooks.Store(st.Unhooks)
	s.tables.Store(int64(st.Tables))
	s.bytes.Store(int64(s.store.HostBytes()))
}

func (s *Shard) drainInbox() {
	s.mu.Lock()
	msgs := s.inbox
	s.inbox = s.spare[:0]
	s.mu.Unlock()
	for i := range msgs {
		m := &msgs[i]
		if m.Fn != nil {
			m.Fn(s.store)
		} else {
			s.out.Reset()
			s.store.Exec(&m.Req, &s.out)
			s.finish(m.Trap)
			if m.Req.Op == vasmon.OpUnhook {
				m.Req.Root.Unhooks.Add(-1)
			}
			if m.Req.Root.InFlight.Add(-1) == 0 {
				s.sink.Settled(m.Req.Root)
			}
		}
		s.publishCounters()
		s.pending.Add(-1)
		s.C.MsgsIn.Add(1)
		*m = Msg{}
	}
	s.mu.Lock()
	s.spare = msgs[:0]
	s.mu.Unlock()
}

func (s *Shard) process(e *Event) {
	w := vasmon.Write{GPA: e.GPA, Data: e.Data, Old: e.Old, RIP: e.RIP, Size: e.Size, HasOld: e.HasOld, Trap: e.Trap, Seen: e.Seen}
	s.out.Reset()
	k := s.store.Write(vasmon.VMID(e.VM), &w, &s.out)
	s.loc.kinds[k]++
	if int(e.Slot) < len(s.VMs) {
		s.loc.vm[e.Slot].kinds[k]++
		s.markDirty(uint32(e.Slot))
	}
	if len(s.out.Reqs) > 0 || len(s.out.Calls) > 0 {
		s.finish(e.Trap)
	}
}

// finish dispatches the structural requests in s.out and invokes the
// callbacks: first every unhook (with those its local execution adds), then
// the callbacks so far - the leaf changes and the removals - and only then
// the hooks, whose additions follow.
func (s *Shard) finish(trap int64) {
	called := 0
	for i := 0; i < len(s.out.Reqs); i++ {
		if s.out.Reqs[i].Op == vasmon.OpUnhook {
			s.dispatch(&s.out.Reqs[i], trap)
		}
	}
	called = s.invokeFrom(called, trap)
	for i := 0; i < len(s.out.Reqs); i++ {
		if s.out.Reqs[i].Op == vasmon.OpHook {
			s.dispatch(&s.out.Reqs[i], trap)
		}
	}
	s.invokeFrom(called, trap)
}

// invokeFrom invokes s.out.Calls[from:] and returns len(s.out.Calls).
func (s *Shard) invokeFrom(from int, trap int64) int {
	n := len(s.out.Calls)
	if from == n {
		return n
	}
	l := &s.loc
	for i := from; i < n; i++ {
		c := &s.out.Calls[i]
		l.untimed[l.nuntimed] = untimed{trap: trap, slot: c.Root.VM.Slot}
		l.nuntimed++
		if l.group == 1 {
			s.timeCallbacks() // slow callbacks: timed exactly, as they start
			s.invoke(c)
			continue
		}
		s.invoke(c)
		if l.nuntimed >= l.group {
			s.timeCallbacks()
		}
	}
	l.callbacks += uint64(n - from)
	return n
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
// batch and message, so no idle time falls inside it. Reading the clock
// costs about 30 ns on the project's machine (kvm-clock): once per callback
// it was a sixth of the worker's time per event.
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

// publishCounters copies the worker's plain counters into the atomics.
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

// ResetSlot zeroes the counters of a VM slot before it is reused. It runs on
// the worker (through Run), which owns the plain counters.
func (s *Shard) ResetSlot(slot uint32) {
	s.Run(func(*vasmon.Store) {
		s.loc.vm[slot] = vmLocal{changed: ^uint64(0)}
		s.markDirty(slot)
		s.publishCounters()
	})
}

// dispatch executes a request here if this shard owns its table, sends it
// otherwise, or holds it back. A hook of a root waits while unhooks of that
// root are in flight anywhere (Root.Unhooks), and behind the root's hooks
// already held here, so that an unlinked subtree's removals are reported
// before a newly linked subtree's additions at the same addresses. Unhooks
// never wait, so unhooking always completes and held hooks are eventually
// released; a hook whose parent entry changed meanwhile is dropped at
// release (vasmon.Store.Linked).
func (s *Shard) dispatch(req *vasmon.Request, trap int64) {
	r := req.Root
	if req.Op == vasmon.OpHook && (r.Unhooks.Load() > 0 || s.holds(r)) {
		r.InFlight.Add(1)
		s.deferred = append(s.deferred, Msg{Req: *req, Trap: trap})
		s.C.Held.Add(1)
		s.C.Deferred.Add(1)
		return
	}
	owner := s.sink.Route(r.VM.ID, req.GPA)
	if owner == s {
		s.store.Exec(req, &s.out)
		return
	}
	r.InFlight.Add(1)
	if req.Op == vasmon.OpUnhook {
		r.Unhooks.Add(1)
	}
	owner.Send(Msg{Req: *req, Trap: trap})
}

// exec executes a released hook here or sends it to its owner.
func (s *Shard) exec(req *vasmon.Request, trap int64) {
	owner := s.sink.Route(req.Root.VM.ID, req.GPA)
	if owner == s {
		s.store.Exec(req, &s.out)
		return
	}
	req.Root.InFlight.Add(1)
	owner.Send(Msg{Req: *req, Trap: trap})
}

func (s *Shard) holds(r *vasmon.Root) bool {
	for i := range s.deferred {
		if s.deferred[i].Req.Root == r {
			return true
		}
	}
	return false
}

// release lets held hooks go, in order per root, once their root has no
// unhook in flight. A hook whose parent was unhooked or re-pointed since is
// dropped.
func (s *Shard) release() {
	held := s.deferred
	s.deferred = s.spareDeferred[:0]
	blocked := s.blocked[:0]
	for i := range held {
		m := held[i]
		r := m.Req.Root
		stop := false
		for _, b := range blocked {
			stop = stop || b == r
		}
		if !stop && r.Unhooks.Load() > 0 {
			blocked = append(blocked, r)
			stop = true
		}
		if stop {
			s.deferred = append(s.deferred, m)
			continue
		}
		if !s.store.Linked(&m.Req) {
			vasmon.Dropped(&m.Req)
			s.C.Dropped.Add(1)
		} else {
			s.out.Reset()
			s.exec(&m.Req, m.Trap)
			s.finish(m.Trap)
		}
		// Only now, so that neither the root nor Engine.Sync sees the
		// work as done before what it caused is counted.
		s.publishCounters()
		if r.InFlight.Add(-1) == 0 {
			s.sink.Settled(r)
		}
		s.C.Held.Add(-1)
	}
	clear(held)
	s.spareDeferred = held[:0]
	clear(blocked)
	s.blocked = blocked[:0]
}

func (s *Shard) invoke(c *vasmon.Call) {
	defer func() {
		if v := recover(); v != nil {
			s.C.Panics.Add(1)
			s.sink.Panic(c.Root, v)
		}
	}()
	c.Root.Callback(c.Root.Ctx, c.VA, c.Old, c.New, c.Size)
}

// Run runs fn on the shard's goroutine with its store and waits for it.
// Once the worker has stopped, fn runs on the caller's goroutine, one
// caller at a time.
func (s *Shard) Run(fn func(*vasmon.Store)) {
	done := make(chan struct{})
	s.Send(Msg{Fn: func(st *vasmon.Store) { fn(st); close(done) }})
	select {
	case <-done:
	case <-s.done:
		select {
		case <-done: // it ran as the worker's last message
		default:
			s.runMu.Lock()
			defer s.runMu.Unlock()
			fn(s.store)
		}
	}
}
