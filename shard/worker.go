package shard

import (
	"fmt"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// Peers is implemented by a Sink whose shards help each other: an idle
// worker runs the steps of a shard whose own worker is parked or stalled.
type Peers interface {
	Shards() []*Shard
}

// Start runs the worker goroutine. It returns once the worker has tried to
// pin itself; a pinning failure is in PinErr and the worker runs unpinned.
func (s *Shard) Start() {
	s.started = true
	ready := make(chan struct{})
	go s.run(ready)
	<-ready
}

// Stop makes the worker exit once the shard has nothing left to do and
// waits for it. Producers must have stopped.
func (s *Shard) Stop() {
	s.quit.Store(true)
	s.spaceMu.Lock()
	s.spaceCond.Broadcast()
	s.spaceMu.Unlock()
	s.signal()
	if s.started {
		<-s.done
	}
}

// Stopped reports whether the worker was asked to stop.
func (s *Shard) Stopped() bool { return s.quit.Load() }

const (
	// stallAfter is how long a shard with work waiting may go without its
	// worker running before an idle peer takes a step of it (the worker
	// is runnable but descheduled: a busy thread shares its CPU).
	stallAfter = 200 * time.Microsecond
	// preempted is the gap between two clock reads of a polling worker
	// from which it concludes it was descheduled: its CPU is contended,
	// and polling takes time from the threads it competes with (vCPUs).
	preempted = 50 * time.Microsecond
	// quietFor is how long a worker that was descheduled while polling
	// parks at once instead of polling.
	quietFor = 20 * time.Millisecond
)

// run is the worker: it takes the ownership token and runs steps while
// there is work, gives the token back, helps its peers, polls a while and
// parks. While another thread holds the token it parks too: the holder
// wakes it when it gives the token back with work left.
//
// Polling adapts: a worker that finds itself descheduled while it polls
// (two clock reads more than 50 us apart: its CPU is shared with busy
// threads) stops polling for 20 ms, so that on a host it shares with its
// guests it does not take their CPU time for nothing. Time spent polling is
// counted (C.SpinNs).
func (s *Shard) run(ready chan struct{}) {
	defer close(s.done)
	runtime.LockOSThread()
	if s.cfg.CPU >= 0 {
		if err := Pin(s.cfg.CPU); err != nil {
			s.PinErr = fmt.Errorf("shard %d runs unpinned: %w", s.cfg.ID, err)
		} else {
			s.pinned.Store(int32(s.cfg.CPU))
		}
	}
	tid := int64(unix.Gettid())
	close(ready)
	var idleSince, quietUntil int64
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		s.beat.Store(Now())
		if s.TryAcquire() {
			s.SetOwnerThread(tid)
			worked := false
			for s.Step(0) {
				worked = true
				s.beat.Store(Now())
				if s.pending.Load() == 0 && s.q.Len() == 0 && len(s.held) == 0 {
					break
				}
			}
			idle := !s.Busy()
			s.SetOwnerThread(0)
			s.owner.Store(0)
			if s.quit.Load() && idle {
				return
			}
			if worked {
				idleSince = 0
				continue
			}
		}
		if s.help(tid) {
			idleSince = 0
			continue
		}
		now := Now()
		if idleSince == 0 {
			idleSince = now
		}
		if now-idleSince < int64(s.cfg.Spin) && now >= quietUntil && !s.Held() {
			// Poll a while before parking: waking a parked,
			// thread-locked worker costs tens of microseconds.
			for i := 0; i < 256 && !s.HasWork(); i++ {
			}
			after := Now()
			s.C.SpinNs.Add(after - now)
			if after-now > int64(preempted) {
				quietUntil = after + int64(quietFor)
			}
			continue
		}
		s.sleeping.Store(true)
		if (!s.HasWork() || s.Held()) && !(s.quit.Load() && !s.Held()) {
			// Held hooks wait for other shards' unhooks; work left
			// unsure waits for guest memory to settle; partial writes
			// for later events; peers may stall: look again now and
			// then.
			d := 2 * time.Millisecond
			if s.C.Held.Load() > 0 || s.C.Retrying.Load() > 0 || s.C.Dirty.Load() > 0 {
				d = 50 * time.Microsecond
			}
			timer.Reset(d)
			select {
			case <-s.wake:
			case <-timer.C:
			}
			timer.Stop()
		}
		s.sleeping.Store(false)
		idleSince = 0
	}
}

// help runs a bounded step of a peer shard that has work waiting while its
// own worker is parked or has not run for stallAfter, and reports whether
// it did.
func (s *Shard) help(tid int64) bool {
	p, ok := s.sink.(Peers)
	if !ok {
		return false
	}
	now := Now()
	for _, o := range p.Shards() {
		if o == s || !o.HasWork() || !o.sleeping.Load() && now-o.beat.Load() < int64(stallAfter) || !o.TryAcquire() {
			continue
		}
		o.SetOwnerThread(tid)
		did := o.Step(0)
		o.SetOwnerThread(0)
		if did {
			o.C.Steals.Add(1)
		}
		o.Release()
		if did {
			return true
		}
	}
	return false
}
