// Package vmlimit holds each VM to an events/s limit in front of an engine
// (issue 19, per-VM limits): a VM that submits faster than its limit is
// throttled, so that one guest cannot take the engine's capacity from the
// others; the engine's own fair ingest and write-flood policy bound what
// it queues and traps, not how fast it submits.
//
// # Contract
//
// Host wraps an engine.Host. Each VM has a token bucket (GCRA): it may
// submit Rate events per second on average and Burst events at once above
// that. A Submit whose events would exceed the VM's allowance is throttled:
//
//   - blocking (the default), the call waits until the allowance covers
//     them, then passes them on whole: the submitting vCPU is held, as a
//     hypervisor holds a vCPU it rate-limits; nothing is lost;
//   - with NonBlocking, the events within the allowance are passed on and
//     the rest refused with ErrThrottled, which wraps engine.ErrOverload
//     (backends treat it as the engine's own overload: counted, retried or
//     dropped as they do those).
//
// A wait ends early when Config.Done closes (the run is stopping): the
// events then pass unthrottled. Every throttled event is counted per VM
// (Stats): Delayed (passed on after a wait) or Refused; Wait is the time
// the VM's submitters spent held. Other methods of the host pass through.
// Host is safe for concurrent use; Submit allocates only for a VM's first
// events.
package vmlimit

import (
	"errors"
	"fmt"
	"math"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// ErrThrottled is returned (non-blocking) for the events of a Submit over
// the VM's limit; it wraps engine.ErrOverload.
var ErrThrottled = fmt.Errorf("%w: VM over its events/s limit", engine.ErrOverload)

// Config configures the limits.
type Config struct {
	Rate        float64 // events/s each VM may submit; must be positive
	Burst       int     // events a VM may submit at once above its rate; 0: DefaultBurst(Rate)
	NonBlocking bool    // refuse the excess instead of waiting
	// Done, when closed, ends every wait (the run is stopping).
	Done <-chan struct{}
	// Now and Sleep are the clock and the wait (nil: shard.Now and a
	// timer that ends early when Done closes); tests replace them.
	Now   func() int64
	Sleep func(d time.Duration, done <-chan struct{})
}

// DefaultBurst is the default burst: 100 ms of the rate, and at least 256
// events (backends submit up to 64 per vCPU at once). Guests are bursty: a
// simulated web server at 20,000 events/s submits up to 2,300 events
// within a millisecond (an munmap of a large buffer), so a burst of 10 ms
// of a 40,000 events/s limit held such a guest 5% of its time
// (BenchmarkNoisyNeighbor -noisy.limit 40000).
func DefaultBurst(rate float64) int { return int(max(256, math.Ceil(rate/10))) }

// Check validates a configuration.
func (c Config) Check() error {
	if !(c.Rate > 0) || math.IsInf(c.Rate, 0) {
		return fmt.Errorf("vmlimit: rate %v: must be a positive number of events/s", c.Rate)
	}
	if c.Burst < 0 {
		return fmt.Errorf("vmlimit: burst %d: must not be negative", c.Burst)
	}
	return nil
}

// Host is an engine.Host whose VMs are held to Config's limits.
type Host struct {
	engine.Host
	cfg      Config
	interval float64 // ns per event
	tau      float64 // ns: the burst's allowance
	vms      sync.Map
}

// bucket is one VM's allowance: tat is the theoretical arrival time (ns)
// of its next event.
type bucket struct {
	mu               sync.Mutex
	tat              float64
	delayed, refused atomic.Uint64
	wait             atomic.Int64
}

// New wraps h.
func New(h engine.Host, cfg Config) (*Host, error) {
	if err := cfg.Check(); err != nil {
		return nil, err
	}
	if cfg.Burst == 0 {
		cfg.Burst = DefaultBurst(cfg.Rate)
	}
	if cfg.Now == nil {
		cfg.Now = shard.Now
	}
	if cfg.Sleep == nil {
		cfg.Sleep = sleep
	}
	iv := 1e9 / cfg.Rate
	return &Host{Host: h, cfg: cfg, interval: iv, tau: float64(cfg.Burst) * iv}, nil
}

func sleep(d time.Duration, done <-chan struct{}) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-done:
	}
}

// Config returns the effective configuration.
func (h *Host) Config() Config { return h.cfg }

func (h *Host) bucket(vm vasmon.VMID) *bucket {
	if b, ok := h.vms.Load(vm); ok {
		return b.(*bucket)
	}
	b, _ := h.vms.LoadOrStore(vm, new(bucket))
	return b.(*bucket)
}

// Submit passes evs on within vm's limit; see the package comment.
func (h *Host) Submit(vm vasmon.VMID, evs []shard.Event) (int, error) {
	n := len(evs)
	if n == 0 {
		return h.Host.Submit(vm, evs)
	}
	b := h.bucket(vm)
	now := float64(h.cfg.Now())
	b.mu.Lock()
	tat := max(b.tat, now)
	if h.cfg.NonBlocking {
		// The events that fit: tat + k*interval - now <= tau.
		k := min(n, int(math.Floor((now+h.tau-tat)/h.interval+1e-9)))
		k = max(k, 0)
		b.tat = tat + float64(k)*h.interval
		b.mu.Unlock()
		if k == n {
			return h.Host.Submit(vm, evs)
		}
		b.refused.Add(uint64(n - k))
		if k == 0 {
			return 0, ErrThrottled
		}
		m, err := h.Host.Submit(vm, evs[:k])
		if err != nil {
			return m, err
		}
		return m, ErrThrottled
	}
	// Blocking: reserve the events now (later submitters of the VM queue
	// behind), then wait until they are within the allowance.
	b.tat = tat + float64(n)*h.interval
	wait := time.Duration(b.tat - h.tau - now)
	b.mu.Unlock()
	if wait > 0 {
		b.delayed.Add(uint64(n))
		b.wait.Add(int64(wait))
		h.cfg.Sleep(wait, h.cfg.Done)
	}
	return h.Host.Submit(vm, evs)
}

// VMStats are one VM's throttled events.
type VMStats struct {
	VM      vasmon.VMID
	Delayed uint64        // events passed on after a wait (blocking)
	Refused uint64        // events refused with ErrThrottled (non-blocking)
	Wait    time.Duration // time the VM's submitters were held (blocking)
}

// Throttled is the VM's throttled events: delayed and refused.
func (s VMStats) Throttled() uint64 { return s.Delayed + s.Refused }

// Stats returns the counts of every VM that submitted, by VM ID.
func (h *Host) Stats() []VMStats {
	var out []VMStats
	h.vms.Range(func(k, v any) bool {
		b := v.(*bucket)
		out = append(out, VMStats{VM: k.(vasmon.VMID), Delayed: b.delayed.Load(), Refused: b.refused.Load(), Wait: time.Duration(b.wait.Load())})
		return true
	})
	sort.Slice(out, func(i, j int) bool { return out[i].VM < out[j].VM })
	return out
}

// Unwrap returns the wrapped host.
func (h *Host) Unwrap() engine.Host { return h.Host }

var _ engine.Host = (*Host)(nil)

// IsThrottled reports whether err is (or wraps) ErrThrottled.
func IsThrottled(err error) bool { return errors.Is(err, ErrThrottled) }
