package plan

import (
	"math"
	"strings"
	"testing"
)

// TestComputeLimits: with a per-VM rate limit every VM is planned at its
// limit and its burst is capped by the limit's; with a queue share the
// engine's fair ingest admits queue depth / (2 x share) VMs.
func TestComputeLimits(t *testing.T) {
	for _, c := range []struct {
		name    string
		limits  Limits
		binding string
		vms     int
		want    map[string]int
	}{
		// cpu 1e6*0.8/20e3 = 40: a limit above the workload's 10k/s
		// plans the VMs at the limit.
		{"rate limit above the workload", Limits{MaxRate: 20e3, MaxBurst: 256}, CPU, 40, map[string]int{Queues: 262}},
		// below it: at the limit, 1e6*0.8/5e3 = 160; the burst is
		// min(100, 10 + 5 per ms) = 15: queues 32768*0.8/15 = 1747.
		{"rate limit below the workload", Limits{MaxRate: 5e3, MaxBurst: 10}, CPU, 160, map[string]int{Queues: 1747}},
		// share: 16384 / (2*1024) = 8, no headroom.
		{"queue share binds", Limits{Share: 1024}, QueueShare, 8, map[string]int{CPU: 80}},
	} {
		t.Run(c.name, func(t *testing.T) {
			in := base()
			in.Limits = c.limits
			p, err := Compute(in)
			if err != nil {
				t.Fatal(err)
			}
			if got := p.Constraints[p.Binding].Name; got != c.binding || p.VMs != c.vms {
				t.Fatalf("binding %s with %d VMs, want %s with %d (%+v)", got, p.VMs, c.binding, c.vms, p.Constraints)
			}
			for _, k := range p.Constraints {
				if want, ok := c.want[k.Name]; ok && k.VMs != want {
					t.Errorf("%s admits %d VMs, want %d", k.Name, k.VMs, want)
				}
			}
			rate := in.Workload.RatePerVM
			if c.limits.MaxRate > 0 {
				rate = c.limits.MaxRate
			}
			if p.Load != float64(p.VMs)*rate {
				t.Errorf("load %v for %d VMs at %v events/s", p.Load, p.VMs, rate)
			}
			var b strings.Builder
			if err := p.WriteTable(&b); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(b.String(), "per-VM limits:") {
				t.Errorf("the table does not say the limits:\n%s", b.String())
			}
		})
	}
	for _, l := range []Limits{{MaxRate: -1}, {MaxRate: math.Inf(1)}, {MaxRate: math.NaN()}, {Share: -1}, {MaxRate: 1, MaxBurst: -1}} {
		in := base()
		in.Limits = l
		if _, err := Compute(in); err == nil {
			t.Errorf("limits %+v: no error", l)
		}
	}
}
