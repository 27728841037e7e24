package plan

import (
	"bytes"
	"math"
	"strings"
	"testing"
	"time"
)

var promise = Promise{VMs: 22, VCPUs: 2, RatePerVM: 20000, Events: 440000, P50: 90 * time.Microsecond, P99: 625 * time.Microsecond,
	P999: 3 * time.Millisecond, Budget: time.Millisecond, QueuePeak: 1400, QueueHave: 26214.4, BytesPerTable: 6083, MemBytes: 17 << 20, MemHave: 8 << 30}

// good is a run that keeps promise, within the goals.
var good = Measured{Window: 3 * time.Second, Events: 439000, P50: 95 * time.Microsecond, P99: 700 * time.Microsecond, P999: 3 * time.Millisecond,
	Callbacks: 1000000, OverBudget: 2000, QueuePeak: 900, Tables: 2926, Bytes: 2926 * 6100}

func TestPromiseRoundTrip(t *testing.T) {
	p := promise
	p.Budget = 0 // not in the string: the command's -budget
	got, err := ParsePromise(p.String())
	if err != nil {
		t.Fatal(err)
	}
	// Floats go through 7 significant digits.
	if got.VMs != p.VMs || got.VCPUs != p.VCPUs || got.P50 != p.P50 || got.P99 != p.P99 || got.P999 != p.P999 ||
		math.Abs(got.MemHave-p.MemHave) > 1e-6*p.MemHave || got.QueueHave != p.QueueHave || got.Events != p.Events || got.MemBytes != p.MemBytes {
		t.Fatalf("round trip: got %+v, want %+v", got, p)
	}
	if strings.ContainsFunc(p.String(), func(r rune) bool { return r > 127 || r == ' ' }) {
		t.Errorf("the promise is not one ASCII word: %q", p.String())
	}
}

func TestParsePromiseErrors(t *testing.T) {
	ok := promise.String()
	for _, s := range []string{"", "vms", "vms=22", ok + ",vms=3", ok + ",x=1", strings.Replace(ok, "vms=22", "vms=-1", 1),
		strings.Replace(ok, "rate=20000", "rate=0", 1), strings.Replace(ok, "p99=625000ns", "p99=-5ns", 1),
		strings.Replace(ok, "mem=", "mem=Inf,y=", 1), strings.Replace(ok, "events=440000", "events=NaN", 1)} {
		if _, err := ParsePromise(s); err == nil {
			t.Errorf("ParsePromise(%q): no error", s)
		}
	}
}

// TestVerify: each way a run can break the promise is found, and only it.
func TestVerify(t *testing.T) {
	for _, c := range []struct {
		name   string
		change func(*Measured)
		broken []string
	}{
		{"kept", func(*Measured) {}, nil},
		{"p99 over the budget", func(m *Measured) { m.P99 = 1100 * time.Microsecond }, []string{"p99"}},
		{"p99 at the budget", func(m *Measured) { m.P99 = time.Millisecond }, nil},
		{"load not sustained", func(m *Measured) { m.Events = 0.8 * promise.Events }, []string{"events/s"}},
		{"queues over what was kept", func(m *Measured) { m.QueuePeak = 30000 }, []string{"queue peak"}},
		{"events rejected", func(m *Measured) { m.Rejected = 1 }, []string{"queue peak"}},
		{"memory over what was kept", func(m *Measured) { m.Bytes = 9 << 30 }, []string{"table memory"}},
	} {
		m := good
		c.change(&m)
		cs := Verify(promise, m)
		var names []string
		for _, b := range Broken(cs) {
			names = append(names, b.Name)
		}
		if strings.Join(names, ",") != strings.Join(c.broken, ",") {
			t.Errorf("%s: broken %v, want %v", c.name, names, c.broken)
		}
		var buf bytes.Buffer
		if err := WriteVerify(&buf, promise, m, cs); err != nil {
			t.Fatal(err)
		}
		failed := strings.Contains(buf.String(), "verify: FAILED")
		if failed != (len(c.broken) > 0) {
			t.Errorf("%s: verdict line wrong:\n%s", c.name, buf.String())
		}
	}
}

// TestVerifyGoals: the goals' verdicts follow the errors.
func TestVerifyGoals(t *testing.T) {
	cs := Verify(promise, good)
	want := map[string]bool{"p99": true, "bytes per table": true, "table memory": true}
	for _, c := range cs {
		if c.Goal == 0 {
			continue
		}
		if !want[c.Name] {
			t.Errorf("%s has a goal", c.Name)
		}
		// p99 700 us for 625: +12%; 6100 bytes per table for 6083: +0.3%;
		// 17.0 MiB for 17 MiB: +0.3%.
		if !c.GoalMet() {
			t.Errorf("%s: off by %.1f%%, goal %.0f%%: not met", c.Name, 100*c.Err, 100*c.Goal)
		}
	}
	m := good
	m.P99 = 800 * time.Microsecond // +28%
	for _, c := range Verify(promise, m) {
		if c.Name == "p99" && c.GoalMet() {
			t.Errorf("p99 off by %.0f%%: goal met", 100*c.Err)
		}
	}
}

func TestQuantilesAt(t *testing.T) {
	c := Curve{Points: []Point{{Offered: 100, P50: 10, P99: 100, P999: 1000}, {Offered: 300, P50: 30, P99: 300, P999: 3000}}}
	for _, x := range []struct {
		rate           float64
		p50, p99, p999 time.Duration
	}{{50, 10, 100, 1000}, {100, 10, 100, 1000}, {200, 20, 200, 2000}, {300, 30, 300, 3000}, {1000, 30, 300, 3000}} {
		p50, p99, p999 := c.QuantilesAt(x.rate)
		if p50 != x.p50 || p99 != x.p99 || p999 != x.p999 {
			t.Errorf("at %v: %v %v %v, want %v %v %v", x.rate, p50, p99, p999, x.p50, x.p99, x.p999)
		}
		if p99 != c.P99At(x.rate) {
			t.Errorf("at %v: p99 %v, P99At %v", x.rate, p99, c.P99At(x.rate))
		}
	}
}
