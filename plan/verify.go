package plan

import (
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// Promise is what a plan says its configuration will do on this host:
// the figures `vasengine plan -verify` checks against a run of that
// configuration. Predicted figures (P50..P999, Bytes*) are estimates; the
// budget, the queue capacity and the memory for tables (after headroom) are
// the limits the plan promised to stay within.
type Promise struct {
	VMs, VCPUs     int           // planned VMs, vCPUs per VM
	RatePerVM      float64       // events/s each VM produces
	Events         float64       // predicted events/s processed: VMs x RatePerVM
	P50, P99, P999 time.Duration // predicted trap-to-callback latency at that load
	Budget         time.Duration // the p99 budget
	// QueuePeak: predicted peak of queued events (0: not predicted);
	// QueueHave: the queues' capacity kept after headroom.
	QueuePeak, QueueHave float64
	// BytesPerTable, MemBytes: predicted host bytes per hooked table and in
	// all at the peak of hooked tables (the run summary's accounting);
	// MemHave: memory for tables after headroom.
	BytesPerTable, MemBytes, MemHave float64
}

// Measured is what a run of the planned configuration did, over its
// measured window (after its VMs were up and a warm-up).
type Measured struct {
	Window         time.Duration
	Events         float64 // events/s processed
	P50, P99, P999 time.Duration
	Callbacks      uint64
	OverBudget     uint64 // callbacks later than the budget
	QueuePeak      int    // most events queued at once (sampled)
	Rejected       uint64 // events the engine refused
	Tables         int64  // peak hooked tables (sampled)
	Bytes          int64  // host bytes of the tables at that peak
}

// Goals of a plan's predictions (issue 18): the measured p99 within
// P99Goal of the predicted one, memory within MemGoal.
const (
	P99Goal = 0.20
	MemGoal = 0.10
)

// Check is one constraint's predicted and measured figures.
type Check struct {
	Name                string
	Predicted, Measured string
	Err                 float64 // (measured - predicted) / predicted; NaN: not comparable
	Goal                float64 // the error allowed by the goals (0: none)
	Limit               string  // what the plan promised (empty: nothing)
	Broken              bool    // the run broke the promise
	Why                 string  // why it is broken
}

// GoalMet reports whether the check's error is within its goal (true when
// it has none).
func (c Check) GoalMet() bool { return c.Goal == 0 || math.Abs(c.Err) <= c.Goal }

// Verify compares a run with its plan's promise. A promise is broken when
// the measured p99 is over the budget, the run could not sustain the
// planned rate (achieved below SaturationRatio of it), the queues overflowed
// their capacity after headroom or refused events, or the tables needed
// more memory than the plan kept for them.
func Verify(p Promise, m Measured) []Check {
	rel := func(pred, meas float64) float64 {
		if pred <= 0 {
			return math.NaN()
		}
		return (meas - pred) / pred
	}
	var cs []Check
	ev := Check{Name: "events/s", Predicted: SI(p.Events), Measured: SI(m.Events), Err: rel(p.Events, m.Events),
		Limit: fmt.Sprintf(">= %s (%.0f%%)", SI(SaturationRatio*p.Events), 100*SaturationRatio)}
	if m.Events < SaturationRatio*p.Events {
		ev.Broken, ev.Why = true, "the host did not sustain the planned load"
	}
	cs = append(cs, ev)
	lat := func(name string, pred, meas time.Duration, goal float64, promised bool) {
		c := Check{Name: name, Predicted: dur(pred), Measured: dur(meas), Err: rel(float64(pred), float64(meas)), Goal: goal}
		if promised {
			c.Limit = "<= " + dur(p.Budget) + " (budget)"
			if meas > p.Budget {
				c.Broken, c.Why = true, "over the budget"
			}
		}
		cs = append(cs, c)
	}
	lat("p50", p.P50, m.P50, 0, false)
	lat("p99", p.P99, m.P99, P99Goal, true)
	lat("p99.9", p.P999, m.P999, 0, false)
	q := Check{Name: "queue peak", Measured: fmt.Sprintf("%d events", m.QueuePeak), Err: math.NaN(),
		Limit: fmt.Sprintf("<= %.0f events", p.QueueHave)}
	if p.QueuePeak > 0 {
		q.Predicted = fmt.Sprintf("<= %.0f events", p.QueuePeak)
	} else {
		q.Predicted = "-"
	}
	switch {
	case p.QueueHave > 0 && float64(m.QueuePeak) > p.QueueHave:
		q.Broken, q.Why = true, "the queues held more than the plan kept for them"
	case m.Rejected > 0:
		q.Broken, q.Why = true, fmt.Sprintf("%d events rejected", m.Rejected)
	}
	cs = append(cs, q)
	bpt := 0.0
	if m.Tables > 0 {
		bpt = float64(m.Bytes) / float64(m.Tables)
	}
	cs = append(cs, Check{Name: "bytes per table", Predicted: Bytes(p.BytesPerTable), Measured: Bytes(bpt),
		Err: rel(p.BytesPerTable, bpt), Goal: MemGoal})
	mem := Check{Name: "table memory", Predicted: Bytes(p.MemBytes), Measured: fmt.Sprintf("%s (%d tables)", Bytes(float64(m.Bytes)), m.Tables),
		Err: rel(p.MemBytes, float64(m.Bytes)), Goal: MemGoal}
	if p.MemHave > 0 {
		mem.Limit = "<= " + Bytes(p.MemHave)
		if float64(m.Bytes) > p.MemHave {
			mem.Broken, mem.Why = true, "more than the memory kept for tables"
		}
	}
	cs = append(cs, mem)
	return cs
}

// Broken returns the checks whose promise the run broke.
func Broken(cs []Check) []Check {
	var b []Check
	for _, c := range cs {
		if c.Broken {
			b = append(b, c)
		}
	}
	return b
}

// WriteVerify writes the checks as a table, then a verdict line.
func WriteVerify(w io.Writer, p Promise, m Measured, cs []Check) error {
	var b strings.Builder
	fmt.Fprintf(&b, "verify: %d VMs x %d vCPUs at %s events/s each, measured over %v\n", p.VMs, p.VCPUs, SI(p.RatePerVM), m.Window.Round(time.Millisecond))
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "  constraint\tpredicted\tmeasured\toff by\tgoal\tpromised\tverdict\t")
	for _, c := range cs {
		off, goal := "-", "-"
		if !math.IsNaN(c.Err) {
			off = fmt.Sprintf("%+.0f%%", 100*c.Err)
		}
		if c.Goal > 0 {
			goal = fmt.Sprintf("±%.0f%%: ", 100*c.Goal)
			if c.GoalMet() {
				goal += "met"
			} else {
				goal += "MISSED"
			}
		}
		limit, verdict := c.Limit, "ok"
		if limit == "" {
			limit, verdict = "-", "-"
		}
		if c.Broken {
			verdict = "BROKEN: " + c.Why
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", c.Name, c.Predicted, c.Measured, off, goal, limit, verdict)
	}
	tw.Flush()
	if m.Callbacks > 0 {
		fmt.Fprintf(&b, "  %d of %d callbacks over the budget of %v (%.3f%%)\n", m.OverBudget, m.Callbacks, p.Budget, 100*float64(m.OverBudget)/float64(m.Callbacks))
	}
	if bad := Broken(cs); len(bad) > 0 {
		names := make([]string, len(bad))
		for i, c := range bad {
			names[i] = c.Name
		}
		fmt.Fprintf(&b, "verify: FAILED: the run broke the plan's promise (%s)\n", strings.Join(names, ", "))
	} else {
		b.WriteString("verify: the run kept the plan's promise\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// String encodes the promise as the value of `plan -promise`: key=value
// pairs separated by commas, durations in nanoseconds, so that the verify
// command a plan prints checks exactly what that plan promised.
func (p Promise) String() string {
	f := func(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }
	return strings.Join([]string{
		"vms=" + strconv.Itoa(p.VMs), "vcpus=" + strconv.Itoa(p.VCPUs), "rate=" + f(p.RatePerVM), "events=" + f(p.Events),
		"p50=" + nsStr(p.P50), "p99=" + nsStr(p.P99), "p999=" + nsStr(p.P999),
		"queue=" + f(p.QueuePeak), "queue-have=" + f(p.QueueHave),
		"table-bytes=" + f(p.BytesPerTable), "mem=" + f(p.MemBytes), "mem-have=" + f(p.MemHave),
	}, ",")
}

// ParsePromise parses Promise.String's form (the budget is not in it: it
// is the command's -budget). Every key is required, once.
func ParsePromise(s string) (Promise, error) {
	var p Promise
	seen := map[string]bool{}
	ints := map[string]*int{"vms": &p.VMs, "vcpus": &p.VCPUs}
	floats := map[string]*float64{"rate": &p.RatePerVM, "events": &p.Events, "queue": &p.QueuePeak, "queue-have": &p.QueueHave,
		"table-bytes": &p.BytesPerTable, "mem": &p.MemBytes, "mem-have": &p.MemHave}
	durs := map[string]*time.Duration{"p50": &p.P50, "p99": &p.P99, "p999": &p.P999}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok {
			return p, fmt.Errorf("%q: want key=value", kv)
		}
		if seen[k] {
			return p, fmt.Errorf("%s given twice", k)
		}
		seen[k] = true
		switch {
		case ints[k] != nil:
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				return p, fmt.Errorf("%s=%q: want a positive integer", k, v)
			}
			*ints[k] = n
		case floats[k] != nil:
			x, err := strconv.ParseFloat(v, 64)
			if err != nil || !(x >= 0) || math.IsInf(x, 0) {
				return p, fmt.Errorf("%s=%q: want a finite number, not negative", k, v)
			}
			*floats[k] = x
		case durs[k] != nil:
			d, err := time.ParseDuration(v)
			if err != nil || d < 0 {
				return p, fmt.Errorf("%s=%q: want a duration", k, v)
			}
			*durs[k] = d
		default:
			return p, fmt.Errorf("unknown key %q", k)
		}
	}
	var missing []string
	for _, m := range []map[string]bool{keys(ints), keys(floats), keys(durs)} {
		for k := range m {
			if !seen[k] {
				missing = append(missing, k)
			}
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		return p, errors.New("missing " + strings.Join(missing, ", "))
	}
	if !(p.RatePerVM > 0) {
		return p, errors.New("rate must be positive")
	}
	return p, nil
}

// nsStr writes a duration in whole nanoseconds (ASCII, exact).
func nsStr(d time.Duration) string { return strconv.FormatInt(int64(d), 10) + "ns" }

func keys[V any](m map[string]V) map[string]bool {
	out := map[string]bool{}
	for k := range m {
		out[k] = true
	}
	return out
}

// QuantilesAt interpolates the curve's p50, p99 and p99.9 at rate, as
// P99At does the p99.
func (c *Curve) QuantilesAt(rate float64) (p50, p99, p999 time.Duration) {
	ps := c.sorted()
	if len(ps) == 0 {
		return 0, 0, 0
	}
	at := func(q, p Point, f float64) (time.Duration, time.Duration, time.Duration) {
		lerp := func(a, b time.Duration) time.Duration { return a + time.Duration(f*float64(b-a)) }
		return lerp(q.P50, p.P50), lerp(q.P99, p.P99), lerp(q.P999, p.P999)
	}
	if rate <= ps[0].Rate() {
		return ps[0].P50, ps[0].P99, ps[0].P999
	}
	for i := 1; i < len(ps); i++ {
		q, p := ps[i-1], ps[i]
		if rate <= p.Rate() {
			if p.Rate() == q.Rate() {
				return max(p.P50, q.P50), max(p.P99, q.P99), max(p.P999, q.P999)
			}
			return at(q, p, (rate-q.Rate())/(p.Rate()-q.Rate()))
		}
	}
	last := ps[len(ps)-1]
	return last.P50, last.P99, last.P999
}
