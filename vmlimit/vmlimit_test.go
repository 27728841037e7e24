package vmlimit

import (
	"errors"
	"testing"
	"time"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// countHost counts what reaches the engine, per VM.
type countHost struct {
	engine.Host
	got map[vasmon.VMID]int
}

func (h *countHost) Submit(vm vasmon.VMID, evs []shard.Event) (int, error) {
	h.got[vm] += len(evs)
	return len(evs), nil
}

// clock is a fake clock: Sleep advances it.
type clock struct {
	ns    int64
	slept time.Duration
}

func (c *clock) now() int64 { return c.ns }
func (c *clock) sleep(d time.Duration, _ <-chan struct{}) {
	c.ns += int64(d)
	c.slept += d
}

func newTest(t *testing.T, cfg Config) (*Host, *countHost, *clock) {
	t.Helper()
	c := &clock{ns: 1e9}
	ch := &countHost{got: map[vasmon.VMID]int{}}
	cfg.Now, cfg.Sleep = c.now, c.sleep
	h, err := New(ch, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return h, ch, c
}

func TestCheck(t *testing.T) {
	for _, cfg := range []Config{{}, {Rate: -1}, {Rate: 1e3, Burst: -1}} {
		if _, err := New(&countHost{}, cfg); err == nil {
			t.Errorf("New(%+v): no error", cfg)
		}
	}
}

// A VM within its limit is never held; one over it is held to the rate
// (blocking): its events all pass, later, and are counted delayed.
func TestBlocking(t *testing.T) {
	h, ch, c := newTest(t, Config{Rate: 1000, Burst: 100})
	evs := make([]shard.Event, 50)
	// VM 1 at 500 events/s: 50 every 100 ms, for 10 s.
	for i := 0; i < 100; i++ {
		if k, err := h.Submit(1, evs); k != 50 || err != nil {
			t.Fatalf("VM 1: Submit = %d, %v", k, err)
		}
		c.ns += 100e6
	}
	if c.slept != 0 {
		t.Fatalf("VM 1 within its limit was held %v", c.slept)
	}
	// VM 2 submits as fast as it can: 20,000 events take 19.9 s at
	// 1000/s once its burst of 100 is spent.
	start := c.ns
	for i := 0; i < 400; i++ {
		if k, err := h.Submit(2, evs); k != 50 || err != nil {
			t.Fatalf("VM 2: Submit = %d, %v", k, err)
		}
	}
	el := time.Duration(c.ns - start)
	if want := 19900 * time.Millisecond; el < want-time.Millisecond || el > want+time.Millisecond {
		t.Errorf("VM 2: 20000 events took %v at 1000/s with a burst of 100, want %v", el, want)
	}
	if ch.got[1] != 5000 || ch.got[2] != 20000 {
		t.Errorf("passed on: %v, want every event", ch.got)
	}
	st := h.Stats()
	if len(st) != 2 || st[0].Throttled() != 0 || st[1].Delayed != 20000-100 || st[1].Refused != 0 || st[1].Wait != el {
		t.Errorf("stats %+v: want VM 1 untouched, VM 2 delayed 19900 events for %v", st, el)
	}
}

// Non-blocking: the events within the allowance pass, the rest are refused
// with ErrThrottled (an engine.ErrOverload) and counted.
func TestNonBlocking(t *testing.T) {
	h, ch, c := newTest(t, Config{Rate: 1000, Burst: 100, NonBlocking: true})
	evs := make([]shard.Event, 64)
	if k, err := h.Submit(3, evs); k != 64 || err != nil {
		t.Fatalf("first Submit = %d, %v", k, err)
	}
	k, err := h.Submit(3, evs) // 36 left of the burst
	if k != 36 || !errors.Is(err, ErrThrottled) || !errors.Is(err, engine.ErrOverload) {
		t.Fatalf("second Submit = %d, %v; want 36, ErrThrottled", k, err)
	}
	if k, err := h.Submit(3, evs); k != 0 || !IsThrottled(err) {
		t.Fatalf("third Submit = %d, %v; want 0, ErrThrottled", k, err)
	}
	c.ns += 10e6 // 10 events' worth
	if k, err := h.Submit(3, evs); k != 10 || !IsThrottled(err) {
		t.Fatalf("after 10 ms: Submit = %d, %v; want 10", k, err)
	}
	if ch.got[3] != 110 {
		t.Errorf("passed on %d events, want 110", ch.got[3])
	}
	if st := h.Stats(); len(st) != 1 || st[0].Refused != 28+64+54 || st[0].Delayed != 0 || c.slept != 0 {
		t.Errorf("stats %+v, slept %v: want 146 refused, nobody held", st, c.slept)
	}
}

// A wait ends when Done closes: the events pass.
func TestDoneEndsWait(t *testing.T) {
	done := make(chan struct{})
	close(done)
	ch := &countHost{got: map[vasmon.VMID]int{}}
	h, err := New(ch, Config{Rate: 1e-3, Burst: 1, Done: done}) // one event per 1000 s
	if err != nil {
		t.Fatal(err)
	}
	evs := make([]shard.Event, 64)
	for i := 0; i < 3; i++ {
		if k, err := h.Submit(1, evs); k != 64 || err != nil {
			t.Fatalf("Submit = %d, %v", k, err)
		}
	}
	if ch.got[1] != 192 || h.Stats()[0].Delayed != 192 {
		t.Errorf("passed %d, stats %+v: want all 192 passed and counted delayed", ch.got[1], h.Stats())
	}
}
