// Package explore runs the engine deterministically: one seeded scheduler
// chooses every step of every shard and every step of every actor (guest
// vCPUs that write page tables and submit their traps, a controller that
// starts and stops roots, adds and removes VMs, syncs and closes), with no
// worker goroutine and no wall clock deciding anything, so that any
// interleaving the engine allows is reached by some seed and a failing seed
// replays exactly, as FoundationDB's and TigerBeetle's simulators do.
//
// The engine under test is the product's: engine.New with Config.Driver set
// to the scheduler. Actors are goroutines that run one at a time under the
// scheduler's baton; every wait of the engine (engine.Driver.Wait) hands the
// baton back, so an actor blocked in Stop, Sync or a synchronous Submit
// lets the schedule go on, exactly where a thread would block.
//
// While it runs, Run keeps the ground truth: after every guest store, the
// translation map and the tables of every root, so that each callback is
// checked against the entries that ever existed (SEMANTICS.md section 6, no
// phantoms) and each page the engine protects against the pages that ever
// were tables. At quiescent points (writers paused, Engine.Sync) it checks
// the oracle of every root, that exactly the hooked tables' pages are
// protected, that stopped roots and removed VMs left nothing hooked or
// protected, and the accounting.
package explore

import (
	"fmt"
	"math/rand/v2"
	"strings"
)

// sched is the scheduler: an engine.Driver and the baton of the actors.
type sched struct {
	rng    *rand.Rand
	actors []*actor
	cur    *actor
	back   chan struct{} // an actor hands the baton back
	steps  int
	limit  int
	trace  []string // the last steps, for a failure's report
	failed error
	onStep func() // the scheduler's own moves (shard steps, cancellations)
}

// actor is a goroutine that runs only while it holds the baton.
type actor struct {
	name   string
	resume chan struct{}
	done   bool
	fn     func()
	// waiting is set while the actor is blocked in the engine.
	waiting bool
}

// errAbort unwinds an actor's goroutine when the schedule is abandoned.
type errAbort struct{}

func newSched(seed uint64, limit int) *sched {
	return &sched{rng: rand.New(rand.NewPCG(seed, seed^0x9E3779B97F4A7C15)), back: make(chan struct{}), limit: limit}
}

func (s *sched) spawn(name string, fn func()) *actor {
	a := &actor{name: name, resume: make(chan struct{}), fn: fn}
	s.actors = append(s.actors, a)
	go func() {
		<-a.resume
		defer func() {
			if v := recover(); v != nil {
				if _, ok := v.(errAbort); !ok {
					s.fail(fmt.Errorf("actor %s panicked: %v", a.name, v))
				}
			}
			a.done = true
			s.back <- struct{}{}
		}()
		if s.failed != nil {
			panic(errAbort{})
		}
		a.fn()
	}()
	return a
}

// Wait implements engine.Driver: the current actor hands the baton back
// and blocks until the scheduler resumes it.
func (s *sched) Wait() {
	a := s.cur
	if a == nil {
		panic("explore: the engine waits outside an actor")
	}
	a.waiting = true
	s.back <- struct{}{}
	<-a.resume
	a.waiting = false
	if s.failed != nil {
		panic(errAbort{})
	}
}

// yield is Wait for an actor's own pauses.
func (s *sched) yield() { s.Wait() }

func (s *sched) fail(err error) {
	if s.failed == nil {
		s.failed = err
	}
}

func (s *sched) note(format string, args ...any) {
	if len(s.trace) >= traceLen {
		s.trace = s.trace[1:]
	}
	s.trace = append(s.trace, fmt.Sprintf("%6d ", s.steps)+fmt.Sprintf(format, args...))
}

// run runs the schedule until every actor is done, a check fails, or the
// step limit (a hang) is reached.
func (s *sched) run() error {
	for {
		live := s.live()
		if len(live) == 0 || s.failed != nil {
			break
		}
		s.steps++
		if s.steps > s.limit {
			var names []string
			for _, a := range live {
				names = append(names, a.name)
			}
			s.fail(fmt.Errorf("no end after %d steps: actors %s still running (a hang)", s.limit, strings.Join(names, ", ")))
			break
		}
		// The scheduler's own moves, then one actor's.
		if s.onStep != nil && s.rng.IntN(3) != 0 {
			s.onStep()
			if s.failed != nil {
				break
			}
		}
		a := live[s.rng.IntN(len(live))]
		s.cur = a
		a.resume <- struct{}{}
		<-s.back
		s.cur = nil
	}
	// Unwind the actors still blocked.
	for _, a := range s.actors {
		if !a.done {
			s.cur = a
			a.resume <- struct{}{}
			<-s.back
			s.cur = nil
		}
	}
	return s.failed
}

func (s *sched) live() []*actor {
	var l []*actor
	for _, a := range s.actors {
		if !a.done {
			l = append(l, a)
		}
	}
	return l
}

// traceLen is how many of the last steps a failure reports.
var traceLen = 64
