package shard

import (
	"sync/atomic"
	"time"

	"github.com/vasengine/vasengine/vasmon"
)

// Event is one trapped page-table write as a backend submits it, and as a
// shard's ingest queue holds it. It is a fixed-size, pointer-free record of
// 56 bytes (a queue slot with its sequence number fills one 64-byte cache
// line), so queues of events cost the garbage collector nothing.
type Event struct {
	GPA  uint64 // first byte written
	Data uint64 // bytes written, little-endian
	Old  uint64 // whole entry before the write, if HasOld
	RIP  uint64 // writer's instruction pointer, 0 if unknown
	Trap int64  // when the trap was observed, in Now() nanoseconds
	// Ver is the write's stamp on its page's version word
	// (guestmem.Versions.BeginWrite), and Ver2 on the next page's for a
	// store that crosses into it; 0 if unknown (vasmon.Write.Ver).
	Ver, Ver2 uint32
	// Slot is the engine's index of the VM (set by the engine): the key
	// of the VM's pages in a shard's store.
	Slot uint16
	// Ticket is the synchronous submission the event belongs to (set by
	// the engine; 0: asynchronous).
	Ticket uint16
	Size   uint8 // 1..8
	// HasOld says Old was read from guest memory just before the write.
	HasOld bool
	// Cont marks the second part of a store that crosses a page boundary
	// (set by the engine, which splits such stores per page).
	Cont bool
	// Stamped says Ver and Ver2 were taken by BeginWrite before the store
	// reached memory (vasmon.Write.Stamped): the engine may then prove
	// the written value without reading guest memory.
	Stamped bool
}

var epoch = time.Now()

// Now returns the monotonic time used for trap timestamps, in nanoseconds.
// It does not allocate.
func Now() int64 { return int64(time.Since(epoch)) }

// UnixNano converts a time t of Now's clock to Unix nanoseconds (the wall
// clock at the process's start plus t).
func UnixNano(t int64) int64 { return epoch.UnixNano() + t }

// MsgOp is the kind of a control message.
type MsgOp uint8

// Control messages.
const (
	MsgReq   MsgOp = iota // a structural request for a table of this shard
	MsgFlush              // a quiescent point: partial writes end, pages are read again (only Req.Root's, if set)
)

// Msg is a control message between shards, or from the engine. Control
// messages are rare and go through a small mutex-guarded inbox that never
// blocks its sender, so shards cannot deadlock on each other.
type Msg struct {
	Req    vasmon.Request
	Trap   int64
	Ticket uint16
	Op     MsgOp
}

// Verdict is a callback's answer for a synchronous write (SEMANTICS.md
// section 7).
type Verdict uint8

// Verdicts.
const (
	Allow Verdict = iota
	Deny
)

// VerdictCallback is a callback that answers for synchronous writes: Deny
// asks the backend not to let the write take effect. Its answer is ignored
// for asynchronous writes.
type VerdictCallback func(ctx any, va, old, new, size uint64) Verdict

// TracedCallback is a callback that is also given the trap time of the
// write that caused the change (Event.Trap, Now nanoseconds; for a change
// that a Start, a Stop or a flush caused, when the engine was asked).
type TracedCallback func(ctx any, va, old, new, size uint64, trap int64)

// RootState is the executor's per-root state (vasmon.Root.Exec): what the
// shards have in flight for the root.
type RootState struct {
	// InFlight counts structural requests of the root sent to another
	// shard, held back or waiting to run again, and not yet executed.
	InFlight atomic.Int64
	// Unhooks counts the unhook requests among InFlight. Hooks of the
	// root are held back while it is not zero, so that the mappings an
	// unhooked subtree reports removed are reported before the mappings
	// of a subtree linked later at the same addresses are reported new.
	Unhooks atomic.Int64
	// Verdict, if set, is called instead of the root's Callback.
	Verdict VerdictCallback
	// Traced, if set (and Verdict not), is called instead of the root's
	// Callback.
	Traced TracedCallback
}

// StateOf returns the executor state of r (allocated by the engine).
func StateOf(r *vasmon.Root) *RootState { return r.Exec.(*RootState) }

// Ticket is the closure of a synchronous submission: the work its events
// caused that is not yet done (the events themselves, the structural
// requests they produced on any shard, transitively), and the verdict of
// its callbacks.
type Ticket struct {
	n    atomic.Int64
	deny atomic.Bool
	// wait is set while the submitter is parked on wake.
	wait  atomic.Bool
	wake  chan struct{}
	timer *time.Timer
}

// NewTicket returns an idle ticket.
func NewTicket() *Ticket { return &Ticket{wake: make(chan struct{}, 1)} }

// Begin starts a submission of n work items (its events).
func (t *Ticket) Begin(n int) {
	t.deny.Store(false)
	t.n.Store(int64(n))
}

// Add adds work to the closure.
func (t *Ticket) Add(n int64) { t.n.Add(n) }

// Done ends one work item; the last wakes a parked submitter.
func (t *Ticket) Done() {
	if t.n.Add(-1) == 0 && t.wait.Load() {
		select {
		case t.wake <- struct{}{}:
		default:
		}
	}
}

// Pending returns the work items not yet done.
func (t *Ticket) Pending() int64 { return t.n.Load() }

// Denied reports whether a callback of the submission denied it.
func (t *Ticket) Denied() bool { return t.deny.Load() }

// Deny records a Deny verdict.
func (t *Ticket) Deny() { t.deny.Store(true) }

// Park waits until the closure is done, stop is closed or d has passed,
// after the caller found it pending; it reports whether it is done. It is
// called by one goroutine at a time (the submitter).
func (t *Ticket) Park(stop <-chan struct{}, d time.Duration) bool {
	if t.timer == nil {
		t.timer = time.NewTimer(d)
	} else {
		t.timer.Reset(d)
	}
	defer t.timer.Stop()
	t.wait.Store(true)
	defer t.wait.Store(false)
	for t.n.Load() != 0 {
		select {
		case <-t.wake:
		case <-stop:
			return t.n.Load() == 0
		case <-t.timer.C:
			return t.n.Load() == 0
		}
	}
	return true
}
