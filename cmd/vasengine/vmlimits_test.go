package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/sim"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
	"github.com/vasengine/vasengine/vmlimit"
)

// TestVMLimitUsage: bad per-VM limits are usage errors, found before
// anything runs.
func TestVMLimitUsage(t *testing.T) {
	tr := writeTrace(t)
	for _, args := range [][]string{
		{"run", "-vm-max-rate", "-1"},
		{"run", "-vm-max-rate", "NaN"},
		{"run", "-vm-max-rate", "Inf"},
		{"run", "-vm-max-rate", "x"},
		{"run", "-vm-max-burst", "-1", "-vm-max-rate", "1000"},
		{"run", "-vm-max-burst", "100"},
		{"run", "-vm-share", "-1"},
		{"run", "-vm-share", "99999999"},
		{"run", "-vm-share", "8192", "-vms", "8", "-queue-depth", "1024"},
		{"run", "-vm-share", "1048576", "-vms", "1024"},
		{"run", "-backend", "replay", "-trace", tr, "-vm-share", "100"},
		{"replay", "-vm-share", "100", tr},
		{"record", "-o", tr + ".out", "-vm-max-rate", "-5"},
		{"run", "-flood", "bogus"},
		{"run", "-flood", "0/10ms"},
		{"run", "-flood", "100/0s"},
		{"run", "-flood", "100/x"},
	} {
		code, _, stderr := runMain(args...)
		usageFailure(t, args, code, stderr)
	}
}

func TestParseFlood(t *testing.T) {
	for s, want := range map[string]vasmon.FloodPolicy{
		"": {}, "off": {Writes: -1}, "500/2ms": {Writes: 500, Window: 2e6},
	} {
		if got, err := parseFlood(s); err != nil || got != want {
			t.Errorf("parseFlood(%q) = %+v, %v; want %+v", s, got, err, want)
		}
	}
}

// TestVMShare: -vm-share raises the queue depth to 2 x VMs x share, so
// that the engine's fair ingest gives every VM at least that share.
func TestVMShare(t *testing.T) {
	code, out, stderr := runMain("run", "-json", "-vms", "3", "-vm-share", "4096", "-events", "300", "-rate", "0", "-duration", "2m")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var sum summary
	if err := json.Unmarshal([]byte(out), &sum); err != nil {
		t.Fatal(err)
	}
	if sum.Config.QueueDepth != 2*3*4096 || sum.Limits.VMShare != 4096 || sum.Limits.QueueShare < 4096 {
		t.Errorf("queue depth %d, limits %+v: want depth 24576 and a share of at least 4096", sum.Config.QueueDepth, sum.Limits)
	}
	// A larger -queue-depth given stays.
	code, out, stderr = runMain("run", "-json", "-vms", "3", "-vm-share", "16", "-queue-depth", "50000", "-events", "300", "-rate", "0", "-duration", "2m")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	sum = summary{}
	if err := json.Unmarshal([]byte(out), &sum); err != nil {
		t.Fatal(err)
	}
	if sum.Config.QueueDepth != 50000 {
		t.Errorf("queue depth %d, want the 50000 given", sum.Config.QueueDepth)
	}
}

// twoSims runs victims and a flooder, two simulations, against one engine.
type twoSims struct{ victims, flooder *simBackend }

func (b *twoSims) describe() string { return "victims and a flooder" }

func (b *twoSims) prepare(ctx context.Context) error {
	if err := b.victims.prepare(ctx); err != nil {
		return err
	}
	return b.flooder.prepare(ctx)
}

func (b *twoSims) run(ctx context.Context, host engine.Host, req backends.Request) error {
	var wg sync.WaitGroup
	var errs [2]error
	for i, s := range []*simBackend{b.victims, b.flooder} {
		wg.Go(func() { errs[i] = s.run(ctx, host, req) })
	}
	wg.Wait()
	if errs[0] != nil {
		return errs[0]
	}
	return errs[1]
}

func (b *twoSims) report(ran time.Duration) backendReport {
	return backendReport{Stats: map[string]any{"victims": b.victims.s.Stats(), "flooder": b.flooder.s.Stats()}}
}

// TestVMMaxRateFlooder: three victims well within -vm-max-rate (each
// submits fewer events in all than the limit's burst) and one flooder as
// fast as it goes: the flooder is throttled (held, or with -nonblocking its
// excess refused) and counted; the victims are not, and lose nothing.
func TestVMMaxRateFlooder(t *testing.T) {
	for _, nb := range []bool{false, true} {
		args := []string{"-json", "-shards", "1", "-vm-max-rate", "2000", "-vm-max-burst", "1000"}
		if nb {
			args = append(args, "-nonblocking")
		}
		var f engineFlags
		fs := flag.NewFlagSet("run", flag.ContinueOnError)
		f.register(fs)
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		cfg, err := f.config()
		if err != nil {
			t.Fatal(err)
		}
		// Victims: 200 events/s each, 200 events each (overshot by at
		// most one operation per vCPU: a few hundred events), never more
		// than the burst of 1000. The flooder: 5000 events as fast as it
		// goes, at least 2 s at 2000/s once its burst is spent.
		b := &twoSims{
			victims: &simBackend{cfg: sim.Config{VMs: 3, VCPUs: 1, Mode: vasmon.Mode4, Profile: "web", Rate: 200, MaxEvents: 600, Seed: 1}},
			flooder: &simBackend{cfg: sim.Config{VMs: 1, VCPUs: 1, Mode: vasmon.Mode4, Profile: "web", MaxEvents: 5000, Seed: 2, FirstVM: 4}},
		}
		var out, errb bytes.Buffer
		err = runSession(&session{command: "run", cfg: cfg, flags: &f, duration: 2 * time.Minute, b: b, stdout: &out, stderr: &errb})
		if err != nil {
			t.Fatalf("nonblocking %v: %v\n%s", nb, err, errb.String())
		}
		var sum summary
		if err := json.Unmarshal(out.Bytes(), &sum); err != nil {
			t.Fatal(err)
		}
		if sum.Limits.VMMaxRate != 2000 || sum.Limits.VMBurst != 1000 || len(sum.VMs) != 4 {
			t.Fatalf("nonblocking %v: limits %+v, %d VMs", nb, sum.Limits, len(sum.VMs))
		}
		var throttled uint64
		for _, v := range sum.VMs {
			throttled += v.Throttled
			if v.ID == 4 {
				if v.Throttled == 0 {
					t.Errorf("nonblocking %v: the flooder was not throttled: %+v", nb, v)
				}
				if !nb && (v.ThrottleWaitNs == 0 || v.Submitted < 5000) {
					t.Errorf("blocking: the flooder was not held, or lost events: %+v", v)
				}
				if fs := sum.BackendStats.(map[string]any)["flooder"].(map[string]any); nb && uint64(fs["Rejected"].(float64)) < v.Throttled {
					t.Errorf("nonblocking: the flooder's simulator counted %v events refused, the limit %d", fs["Rejected"], v.Throttled)
				}
				continue
			}
			if v.Throttled != 0 || v.Rejected != 0 || v.Submitted == 0 {
				t.Errorf("nonblocking %v: victim %d throttled %d, rejected %d, submitted %d: want 0, 0, some", nb, v.ID, v.Throttled, v.Rejected, v.Submitted)
			}
		}
		if throttled != sum.Limits.Throttled {
			t.Errorf("per-VM throttled %d, total %d", throttled, sum.Limits.Throttled)
		}
		if sum.Events.Submitted != sum.Events.Processed+sum.Events.Rejected {
			t.Errorf("accounting %+v", sum.Events)
		}
	}
}

// TestLimitsText: the text summary shows the limits and the throttled VM.
func TestLimitsText(t *testing.T) {
	sum := &summary{Limits: sumLimits{VMMaxRate: 5000, VMBurst: 256, QueueShare: 1024, Throttled: 7, Floods: 2, FloodPolls: 30},
		VMs: []sumVM{{ID: 1, Submitted: 10}, {ID: 2, Submitted: 99, Throttled: 7, ThrottleWaitNs: 2e9, FloodedPeak: 1}}}
	var b strings.Builder
	sum.writeLimits(&b, 20)
	got := b.String()
	for _, want := range []string{"rate 5.0k events/s (burst 256)", "queue share 1024", "7 events throttled", "2 pages flooded", "flooded pages (peak)"} {
		if !strings.Contains(got, want) {
			t.Errorf("missing %q in:\n%s", want, got)
		}
	}
	lines := strings.Split(strings.TrimSpace(got), "\n")
	if len(lines) != 3 || !strings.Contains(lines[2], "2") || !strings.Contains(lines[2], "2s") {
		t.Errorf("want the header line, the table header and VM 2 only:\n%s", got)
	}
	b.Reset()
	(&summary{}).writeLimits(&b, 20)
	if b.Len() != 0 {
		t.Errorf("no limits, nothing throttled or flooded: printed %q", b.String())
	}
}

// TestPlanVMLimits: plan takes the per-VM limits: VMs planned at their
// rate limit, and the queue share fair ingest must give each.
func TestPlanVMLimits(t *testing.T) {
	report := writeFile(t, "bench.txt", benchTxt)
	// 615.2k events/s within the budget (TestPlanFromReport): at the
	// limit of 5000/s, 123 VMs; a share of 1024 events of a 16384-event
	// queue admits 16384/2048 = 8.
	out := checkPlan(t, []string{"-from-report", report, "-quick", "-vm-rate", "1000", "-headroom", "0", "-mem", "1GiB", "-shards", "2",
		"-vm-max-rate", "5000", "-vm-share", "1024"},
		"every VM is planned at its limit", "queue share", "plan: 8 VMs")
	if !strings.Contains(out, "bound by queue share") || !strings.Contains(out, "123 ") {
		t.Errorf("want cpu at 123 VMs and the queue share binding:\n%s", out)
	}
	for _, args := range [][]string{
		{"plan", "-vm-max-rate", "-1"},
		{"plan", "-vm-max-rate", "NaN"},
		{"plan", "-vm-share", "-1"},
		{"plan", "-vm-max-burst", "10"},
	} {
		code, _, stderr := runMain(args...)
		usageFailure(t, args, code, stderr)
	}
}

// TestLimitMetrics: the limit's counts are exported per VM with the
// engine's label cap (VM 2, past it, is summed as vm="other").
func TestLimitMetrics(t *testing.T) {
	e, err := engine.New(engine.Config{Shards: 1, MaxVMLabels: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	for id := vasmon.VMID(1); id <= 2; id++ {
		g := vasmontest.NewGuest(vasmon.Mode4, 1<<24, 1<<20)
		if err := e.AddVM(id, g.Memory(), g.NewProtections(), 0); err != nil {
			t.Fatal(err)
		}
	}
	lim, err := vmlimit.New(e, vmlimit.Config{Rate: 1, Burst: 10, NonBlocking: true})
	if err != nil {
		t.Fatal(err)
	}
	evs := make([]shard.Event, 15)
	for i := range evs {
		evs[i] = shard.Event{GPA: 0x5000 + uint64(8*i), Size: 8, Data: 1}
	}
	for id := vasmon.VMID(1); id <= 2; id++ {
		if k, err := lim.Submit(id, evs); k != 10 || !vmlimit.IsThrottled(err) {
			t.Fatalf("VM %d: Submit = %d, %v", id, k, err)
		}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(&limitCollector{e: e, lim: lim})
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "vasengine_vm_throttled_events_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			got[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
		}
	}
	if len(got) != 2 || got["1"] != 5 || got["other"] != 5 {
		t.Errorf("throttled series %v, want vm=1 and vm=other at 5 each", got)
	}
}
