// Package plan answers a capacity question from measurements: how many VMs
// (and vCPUs) can this host monitor within a trap-to-callback latency
// budget, with how much headroom, and which resource runs out first.
//
// # Contract
//
// Inputs, all measured or stated by the caller:
//
//   - a cost curve (Curve): points of offered and achieved events/s with
//     the p50/p99/p99.9 latency at that load, measured on the host
//     (vasengine plan runs the engine on the simulator) or read from a
//     saved `go test -bench` output (ParseReport);
//   - a workload per VM (Workload): events/s, tables hooked and the largest
//     burst (events in 1 ms), from a simulator profile at a rate the user
//     gives, a recorded trace (ReadTrace) or a Prometheus text snapshot of
//     vasengine's /metrics (ParseProm);
//   - the host's resources (Inputs): shards and queue depth, memory for
//     tables and bytes per table, the engine's VM slots.
//
// Capacity (Compute): the rate the host sustains within the budget is the
// rate at which the curve's p99 first exceeds it, linearly interpolated
// between the last point within it and the first beyond (latency grows
// convexly with load, so the chord is conservative); a saturated point (the
// host could not keep up with the offered rate) counts as beyond. If no
// point exceeds the budget, the highest measured rate is a lower bound
// (Plan.Bounded is false). A fraction Headroom of every resource is kept
// free, then
//
//	cpu:      floor(rate within budget × (1−headroom) / events/s per VM)
//	queues:   floor(shards × queue depth × (1−headroom) / burst per VM)
//	          (a burst of every VM at once fits in the queues)
//	memory:   floor(memory × (1−headroom) / (tables per VM × bytes per table))
//	vm slots: the engine's Config.MaxVMs
//
// Per-VM limits (Limits: vasengine run -vm-max-rate, -vm-share) change
// what one VM may cost, whatever its workload: with a rate limit every VM
// may submit up to it, so the cpu constraint needs the limit per VM (the
// plan then holds whatever the guests do), and a VM's burst is at most the
// limit's burst plus a window of its rate; with a queue share S every VM
// is guaranteed S events of each shard queue by the engine's fair ingest,
// which gives each of n VMs queue depth / (2n):
//
//	queue share: floor(queue depth / (2 × S))   (no headroom: a guarantee)
//
// and the plan is the smallest (the binding constraint); a resource the
// workload does not use is Unbounded. vCPUs = VMs × vCPUs per VM.
//
// The package does no I/O but through the readers and writers it is given
// and the file WritePlot writes; it runs nothing.
package plan

import (
	"errors"
	"fmt"
	"math"
	"sort"
	"time"
)

// Point is one measurement of the cost curve.
type Point struct {
	Label          string  // e.g. "load=50%", "max", "workload"
	Offered        float64 // events/s offered; 0: closed loop (as fast as possible)
	Achieved       float64 // events/s processed; 0: not measured (taken as Offered)
	P50, P99, P999 time.Duration
	// Saturated: the host did not keep up with the offered rate (achieved
	// well below offered), so producers were held back and the latency
	// understates the delay. Such a point is never within the budget.
	Saturated bool
}

// Rate is the point's rate: what was achieved, or what was offered when
// the achieved rate was not measured.
func (p Point) Rate() float64 {
	if p.Achieved > 0 {
		return p.Achieved
	}
	return p.Offered
}

// SaturationRatio: a paced point whose achieved rate is below this fraction
// of the offered one is saturated. The simulator's pacing is exact over a
// run but bursty over 100 ms (±5% over a second), hence the margin.
const SaturationRatio = 0.85

// Curve is the engine's cost on a host: latency against load.
type Curve struct {
	Source string // where the points come from, for the report
	Points []Point
	Notes  []string // what the report should say about the points
}

// sorted returns the points by ascending rate.
func (c *Curve) sorted() []Point {
	ps := append([]Point(nil), c.Points...)
	sort.SliceStable(ps, func(i, j int) bool { return ps[i].Rate() < ps[j].Rate() })
	return ps
}

// RateWithin returns the rate the host sustains with a p99 within budget
// (see the package comment) and whether the curve crossed the budget
// (false: the rate is only a lower bound).
func (c *Curve) RateWithin(budget time.Duration) (rate float64, bounded bool) {
	ps := c.sorted()
	for i, p := range ps {
		if !p.Saturated && p.P99 <= budget {
			continue
		}
		if i == 0 {
			return 0, true
		}
		q := ps[i-1]
		if p.Saturated || p.P99 <= q.P99 {
			return q.Rate(), true
		}
		f := float64(budget-q.P99) / float64(p.P99-q.P99)
		return q.Rate() + f*(p.Rate()-q.Rate()), true
	}
	if len(ps) == 0 {
		return 0, true
	}
	return ps[len(ps)-1].Rate(), false
}

// MonotoneTolerance: a p99 that falls by more than this factor from one
// point to the next heavier one makes the curve not monotone. The p99s are
// histogram bounds (known within a factor of two at worst) and noisy, hence
// the margin.
const MonotoneTolerance = 1.25

// Inversion is a pair of consecutive points (by rate) whose p99 falls as
// the load rises by more than MonotoneTolerance.
type Inversion struct{ Lighter, Heavier Point }

// Inversions returns the curve's inversions. Latency does not fall as load
// rises: an inverted curve is a measurement problem (a disturbed host,
// workers that park between events at light load, too short a step).
func (c *Curve) Inversions() []Inversion {
	var inv []Inversion
	ps := c.sorted()
	for i := 1; i < len(ps); i++ {
		q, p := ps[i-1], ps[i]
		if !q.Saturated && !p.Saturated && float64(p.P99)*MonotoneTolerance < float64(q.P99) {
			inv = append(inv, Inversion{Lighter: q, Heavier: p})
		}
	}
	return inv
}

// disturbed reports whether a point over the budget is followed by a
// heavier one within it: latency that falls as load rises is noise.
func (c *Curve) disturbed(budget time.Duration) bool {
	over := false
	for _, p := range c.sorted() {
		within := !p.Saturated && p.P99 <= budget
		if over && within {
			return true
		}
		over = over || !within
	}
	return false
}

// P99At interpolates the curve's p99 at rate: below the first point it is
// the first point's (an upper estimate), beyond the last the last point's.
func (c *Curve) P99At(rate float64) time.Duration {
	ps := c.sorted()
	if len(ps) == 0 {
		return 0
	}
	if rate <= ps[0].Rate() {
		return ps[0].P99
	}
	for i := 1; i < len(ps); i++ {
		q, p := ps[i-1], ps[i]
		if rate <= p.Rate() {
			if p.Rate() == q.Rate() {
				return max(p.P99, q.P99)
			}
			f := (rate - q.Rate()) / (p.Rate() - q.Rate())
			return q.P99 + time.Duration(f*float64(p.P99-q.P99))
		}
	}
	return ps[len(ps)-1].P99
}

// Workload is what one monitored VM costs.
type Workload struct {
	Source      string  // where the figures come from, for the report
	VMs         int     // VMs the figures were taken over (0: not applicable)
	RatePerVM   float64 // mean events/s per VM
	PeakRate    float64 // the busiest VM's events/s (0: not known)
	TablesPerVM float64 // page tables hooked per VM
	BurstPerVM  float64 // most events one VM submitted within 1 ms
	VCPUsPerVM  int
	Notes       []string // assumptions the figures rest on
}

// Inputs are everything a plan is computed from.
type Inputs struct {
	Curve         Curve
	Workload      Workload
	Budget        time.Duration // p99 trap-to-callback latency budget
	Headroom      float64       // fraction of every resource kept free, in [0, 1)
	Shards        int
	QueueDepth    int      // events per shard queue
	MemBytes      float64  // host memory the tables may use
	BytesPerTable float64  // host bytes per hooked table
	MaxVMs        int      // engine VM slots (engine.Config.MaxVMs); 0: no limit
	Limits        Limits   // per-VM limits; zero: none
	Notes         []string // where the host's figures come from, for the report
}

// Limits are per-VM limits (see the package comment).
type Limits struct {
	MaxRate  float64 // events/s each VM may submit; 0: no limit
	MaxBurst float64 // events a VM may submit at once above MaxRate (with MaxRate)
	Share    int     // events of each shard queue guaranteed to every VM; 0: none asked
}

// Unbounded is the VM count of a constraint the workload does not use.
const Unbounded = math.MaxInt32

// Constraint is one resource and how many VMs it admits.
type Constraint struct {
	Name string
	Need float64 // per VM
	Have float64 // on the host, headroom taken off
	Unit string  // of Need and Have
	VMs  int     // floor(Have / Need), or Unbounded
}

// Plan is the answer.
type Plan struct {
	Inputs
	RateWithin  float64 // events/s sustained with p99 within the budget
	Bounded     bool    // false: the curve never exceeded the budget (RateWithin is a lower bound)
	Constraints []Constraint
	Binding     int           // index in Constraints of the smallest
	VMs, VCPUs  int           // the plan (Unbounded when nothing binds)
	Load        float64       // events/s of VMs VMs: the operating point
	LoadP99     time.Duration // the curve's p99 at Load
	Inversions  []Inversion   // the curve is not monotone: a measurement problem
	// Alternatives: when no VM fits the budget, the budgets (the p99s the
	// curve measured above it) that would fit some, and how many.
	Alternatives []Alternative
}

// Alternative is what a larger budget would fit.
type Alternative struct {
	Budget  time.Duration
	VMs     int
	Binding string
}

// Constraint names.
const (
	CPU        = "cpu"
	Queues     = "queues"
	QueueShare = "queue share"
	Memory     = "memory"
	VMSlots    = "vm slots"
)

// Compute checks the inputs and computes the plan.
func Compute(in Inputs) (*Plan, error) { return compute(in, true) }

func compute(in Inputs, withAlternatives bool) (*Plan, error) {
	w := in.Workload
	switch {
	case in.Budget <= 0:
		return nil, fmt.Errorf("latency budget %v: must be positive", in.Budget)
	case !(in.Headroom >= 0 && in.Headroom < 1):
		return nil, fmt.Errorf("headroom %v: must be in [0, 1)", in.Headroom)
	case len(in.Curve.Points) == 0:
		return nil, errors.New("the cost curve has no points")
	case in.Shards < 1 || in.QueueDepth < 1:
		return nil, fmt.Errorf("%d shards of queue depth %d: need at least one of each", in.Shards, in.QueueDepth)
	case !(w.RatePerVM >= 0 && w.TablesPerVM >= 0 && w.BurstPerVM >= 0 && in.MemBytes >= 0 && in.BytesPerTable >= 0) || in.MaxVMs < 0:
		return nil, errors.New("rates, tables, bursts, memory and VM slots must not be negative")
	case w.TablesPerVM > 0 && in.BytesPerTable == 0:
		return nil, errors.New("bytes per table unknown")
	case !(in.Limits.MaxRate >= 0 && in.Limits.MaxBurst >= 0) || in.Limits.Share < 0 || math.IsInf(in.Limits.MaxRate, 0):
		return nil, errors.New("per-VM limits must be finite and not negative")
	}
	rate, burst := w.RatePerVM, w.BurstPerVM
	if l := in.Limits; l.MaxRate > 0 {
		rate = l.MaxRate
		burst = min(burst, l.MaxBurst+l.MaxRate*BurstWindow.Seconds())
	}
	p := &Plan{Inputs: in}
	p.RateWithin, p.Bounded = in.Curve.RateWithin(in.Budget)
	keep := 1 - in.Headroom
	p.Constraints = []Constraint{
		{Name: CPU, Need: rate, Have: p.RateWithin * keep, Unit: "events/s"},
		{Name: Queues, Need: burst, Have: float64(in.Shards*in.QueueDepth) * keep, Unit: "queued events"},
		{Name: Memory, Need: w.TablesPerVM * in.BytesPerTable, Have: in.MemBytes * keep, Unit: "bytes"},
	}
	if s := in.Limits.Share; s > 0 {
		p.Constraints = append(p.Constraints, Constraint{Name: QueueShare, Need: float64(2 * s), Have: float64(in.QueueDepth), Unit: "events of each shard queue"})
	}
	if in.MaxVMs > 0 {
		p.Constraints = append(p.Constraints, Constraint{Name: VMSlots, Need: 1, Have: float64(in.MaxVMs), Unit: "VMs"})
	}
	for i := range p.Constraints {
		c := &p.Constraints[i]
		c.VMs = fit(c.Have, c.Need)
		if c.VMs < p.Constraints[p.Binding].VMs {
			p.Binding = i
		}
	}
	p.VMs = p.Constraints[p.Binding].VMs
	p.VCPUs = Unbounded
	if p.VMs < Unbounded {
		p.VCPUs = min(p.VMs*max(w.VCPUsPerVM, 1), Unbounded)
		p.Load = float64(p.VMs) * rate
		p.LoadP99 = in.Curve.P99At(p.Load)
	}
	p.Inversions = in.Curve.Inversions()
	if p.VMs == 0 && withAlternatives {
		p.Alternatives = alternatives(in)
	}
	return p, nil
}

// maxAlternatives bounds the budgets an answer of no VM proposes.
const maxAlternatives = 4

// alternatives tries, as budgets, the p99s the curve measured above the
// budget, in ascending order, and keeps those that fit more VMs than the
// previous one.
func alternatives(in Inputs) []Alternative {
	var budgets []time.Duration
	for _, pt := range in.Curve.Points {
		if !pt.Saturated && pt.P99 > in.Budget {
			budgets = append(budgets, pt.P99)
		}
	}
	sort.Slice(budgets, func(i, j int) bool { return budgets[i] < budgets[j] })
	var alts []Alternative
	for _, b := range budgets {
		alt := in
		alt.Budget = b
		q, err := compute(alt, false)
		if err != nil || q.VMs == 0 || (len(alts) > 0 && q.VMs <= alts[len(alts)-1].VMs) {
			continue
		}
		alts = append(alts, Alternative{Budget: b, VMs: q.VMs, Binding: q.Constraints[q.Binding].Name})
		if len(alts) == maxAlternatives {
			break
		}
	}
	return alts
}

// fit is how many needs fit in have.
func fit(have, need float64) int {
	if need <= 0 {
		return Unbounded
	}
	return int(min(math.Floor(max(have, 0)/need), Unbounded-1))
}

// Use is the fraction of c's resource, headroom included, that n VMs use.
func (c *Constraint) Use(n int, headroom float64) float64 {
	full := c.Have
	if c.Name != VMSlots && c.Name != QueueShare {
		full /= 1 - headroom
	}
	if full <= 0 {
		if n == 0 || c.Need == 0 {
			return 0
		}
		return math.Inf(1)
	}
	return float64(n) * c.Need / full
}
