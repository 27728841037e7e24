package engine

import (
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// Syncer submits the writes of one vCPU synchronously (SEMANTICS.md
// section 7): Submit returns only when the writes' closure is done, on every
// shard: the per-table steps of the written pages, every hook and unhook
// they requested, transitively (a newly linked table's pre-filled children
// included), and every callback these produced. The guest never runs on a
// translation the engine has not seen.
//
// The submitter does the work itself whenever it can: it takes the token of
// every shard that has work and runs its steps (its own write's, and
// whatever is queued ahead of it), so an idle engine adds no thread wake-up
// to the write's stall; only a shard whose worker is busy is waited for.
//
// A Syncer is used by one goroutine at a time (a vCPU thread). It costs one
// of 65535 ticket handles until Close.
type Syncer struct {
	e   *Engine
	vm  vasmon.VMID
	h   uint16
	t   *shard.Ticket
	buf [1]shard.Event
}

// NewSyncer returns a Syncer for the writes of vm.
func (e *Engine) NewSyncer(vm vasmon.VMID) (*Syncer, error) {
	if e.closed.Load() {
		return nil, ErrClosed
	}
	e.tmu.Lock()
	defer e.tmu.Unlock()
	var h uint16
	if n := len(e.tfree); n > 0 {
		h = e.tfree[n-1]
		e.tfree = e.tfree[:n-1]
	} else {
		if len(e.tickets) > 1<<16-1 {
			return nil, ErrTooMany
		}
		h = uint16(len(e.tickets))
		e.tickets = append(e.tickets, shard.NewTicket())
	}
	return &Syncer{e: e, vm: vm, h: h, t: e.tickets[h]}, nil
}

// Close releases the Syncer's ticket handle.
func (s *Syncer) Close() {
	if s.e == nil {
		return
	}
	s.e.tmu.Lock()
	s.e.tfree = append(s.e.tfree, s.h)
	s.e.tmu.Unlock()
	s.e = nil
}

// SubmitOne is Submit of one event.
func (s *Syncer) SubmitOne(ev shard.Event) (shard.Verdict, error) {
	s.buf[0] = ev
	return s.Submit(s.buf[:])
}

// Submit queues evs, in order, and returns when their closure is done, with
// the verdict of their callbacks (RootOptions.Verdict): Deny if any denied.
// On Deny the backend must not let the writes take effect: it restores the
// entries' old bytes in guest memory and submits that restoring write
// (synchronously), so the engine's state and callback stream end as if the
// write had been made and reverted. Errors are those of Engine.Submit, and
// ErrReentrant from a callback, ErrClosed if the engine was closed before
// the closure was done. The stall, from the earliest trap of evs
// (their Trap, or the call if none has one) to the return, is recorded
// (Stats.SyncStall).
func (s *Syncer) Submit(evs []shard.Event) (shard.Verdict, error) {
	e := s.e
	if e.reentrant() {
		return shard.Allow, ErrReentrant
	}
	now := shard.Now()
	trap := now
	for i := range evs {
		if t := evs[i].Trap; t != 0 && t < trap {
			trap = t
		}
	}
	s.t.Begin(0)
	_, err := e.submit(s.vm, evs, s.h, s.t)
	s.drive()
	e.stall.Record(shard.Now() - trap)
	if err == nil && s.t.Pending() > 0 {
		// The engine was closed while the closure was being done: the
		// write was not seen through, so it is not allowed either.
		err = ErrClosed
	}
	if err != nil {
		return shard.Allow, err
	}
	if s.t.Denied() {
		e.verdicts[shard.Deny].Add(1)
		return shard.Deny, nil
	}
	e.verdicts[shard.Allow].Add(1)
	return shard.Allow, nil
}

// syncSpin is how long a synchronous submitter polls for a busy shard
// before it parks.
const syncSpin = 20 * time.Microsecond

// drive runs the shards' steps until the ticket's closure is done, or waits
// for the threads that hold them.
func (s *Syncer) drive() {
	e, t := s.e, s.t
	if t.Pending() == 0 {
		return
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tid := int64(unix.Gettid())
	var since int64
	for t.Pending() > 0 {
		progressed := false
		for _, sh := range e.shards {
			if t.Pending() == 0 {
				break
			}
			if !sh.Busy() || !sh.TryAcquire() {
				continue
			}
			sh.SetOwnerThread(tid)
			if e.cfg.Driver != nil {
				e.cfg.Driver.Wait() // let the schedule interleave while the token is held
			}
			if sh.Step(0) {
				progressed = true
				sh.C.Steals.Add(1)
			}
			sh.SetOwnerThread(0)
			sh.Release()
		}
		if t.Pending() == 0 {
			return
		}
		if e.cfg.Driver != nil {
			e.cfg.Driver.Wait()
			continue
		}
		if progressed {
			since = 0
			continue
		}
		now := shard.Now()
		if since == 0 {
			since = now
		}
		if now-since < int64(syncSpin) {
			runtime.Gosched()
			continue
		}
		if e.stoppedNow() {
			return
		}
		// The shards with work are held by busy threads: park until the
		// last item of the closure is done (a held hook's root may also
		// wait for another shard's unhook: look again now and then).
		t.Park(e.stopped, time.Millisecond)
		since = 0
	}
}
