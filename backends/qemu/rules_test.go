package qemu_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/qemu"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/events"
	"github.com/vasengine/vasengine/events/rules"
)

// ruleSink counts the matches of each rule.
type ruleSink struct {
	mu    sync.Mutex
	p     *events.Pipeline
	count map[string]int
	trap  int // matches that carry a trap time
}

func (s *ruleSink) Name() string { return "count" }
func (s *ruleSink) Open(p *events.Pipeline, _ *events.Counters) error {
	s.p = p
	return nil
}
func (s *ruleSink) Write(ms []events.Match) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range ms {
		s.count[s.p.RuleNames()[ms[i].Rule]]++
		if ms[i].Trap != 0 && ms[i].Trap <= ms[i].Time {
			s.trap++
		}
	}
	return nil
}
func (s *ruleSink) Close(context.Context) error { return nil }

// TestLinuxRWXRule runs the built-in rules on a real Linux guest (issue
// 15): the workload rwx runs /bin/rwx (backends/qemu/guest/rwx: 8 user
// pages mapped writable and executable at once, and a writable page made
// executable) and a fork round, per round. wx-user-page must fire, and
// never more than once per such page: the forks, exec and busybox, which
// Linux maps W^X, add none (the control). Every match carries the trap time of its write,
// before its callback time. Asynchronous delivery may miss a short-lived
// page whose tables are freed before the engine proves its write (a miss,
// never a phantom), so one match is enough.
func TestLinuxRWXRule(t *testing.T) {
	needQEMU(t)
	if testing.Short() {
		t.Skip("-short: one QEMU guest test is enough")
	}
	const rounds, perRound = 4, 9
	e, err := engine.New(engine.Config{Shards: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	sink := &ruleSink{count: map[string]int{}}
	pl, err := events.New(events.Config{Host: "qemu-test", Rules: rules.Default(), Sinks: []events.Sink{sink}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()
	sum, err := qemu.Run(ctx, pl.Wrap(e), qemu.Config{Workload: "rwx", Rounds: rounds, Duration: 120 * time.Second},
		backends.Request{Monitored: backends.DefaultMonitored, Callback: func(any, uint64, uint64, uint64, uint64) {}})
	if err != nil {
		t.Fatal(err)
	}
	if err := pl.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if len(sum.Guests) != 1 || sum.Guests[0].Workload == 0 {
		t.Fatalf("the workload did not finish: %+v", sum.Guests)
	}
	total := 0
	for _, n := range sink.count {
		total += n
	}
	t.Logf("matches per rule %v (%d of %d with their trap time)", sink.count, sink.trap, total)
	if n := sink.count["wx-user-page"]; n == 0 || n > rounds*perRound {
		t.Errorf("%d wx-user-page matches, want 1 to %d (%d rounds of %d writable and executable pages; nothing else in the guest maps one)",
			n, rounds*perRound, rounds, perRound)
	}
	if sink.trap != total {
		t.Errorf("%d of %d matches carry a trap time before their callback time", sink.trap, total)
	}
}
