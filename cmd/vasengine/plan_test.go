package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/common/expfmt"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/sim"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/plan"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// benchTxt is a saved `go test -bench ./bench/` output (trimmed).
const benchTxt = `BenchmarkLatency/load=10%-2   200000   3828 ns/op   261686 offered-events/s   0.1 over-budget-%   6881 p50-ns   12020 p99-ns   35480 p999-ns
BenchmarkLatency/load=50%-2   200000    884 ns/op  1308431 offered-events/s   9.5 over-budget-%  13538 p50-ns   35651 p99-ns   39845 p999-ns
BenchmarkStartMonitor/engine-2   50   20000000 ns/op   200000 tables/s   4313 bytes/table
`

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func checkPlan(t *testing.T, args []string, wants ...string) string {
	t.Helper()
	dir := t.TempDir()
	code, out, stderr := runMain(append(append([]string{"plan"}, args...), "-plot", dir)...)
	if code != 0 {
		t.Fatalf("plan %v: exit %d\n%s%s", args, code, out, stderr)
	}
	for _, want := range append([]string{"cost curve:", "workload:", "constraint", "cpu", "queues", "memory", "vm slots", "\nplan: "}, wants...) {
		if !strings.Contains(out, want) {
			t.Fatalf("plan %v: the output lacks %q:\n%s", args, want, out)
		}
	}
	svg, err := os.ReadFile(filepath.Join(dir, "plan.svg"))
	if err != nil || !bytes.Contains(svg, []byte("<svg")) {
		t.Fatalf("plan %v: no SVG plot: %v", args, err)
	}
	return out
}

// TestPlanQuick measures the cost curve now (briefly), at the plan's
// scale, and plans a profile. What fits depends on the host and its load,
// so only the shape of the answer is checked.
func TestPlanQuick(t *testing.T) {
	checkPlan(t, []string{"-quick", "-vms", "4", "-budget", "1ms", "-mem", "1GiB"},
		"measured now at the plan's scale on", "4 VMs", "simulator profile web", "<- binding", "1.00 GiB for tables", "\nverify: ")
}

// TestPlanFromReport: the curve from a saved bench output, the workload
// from a profile (measured briefly for its tables and bursts).
func TestPlanFromReport(t *testing.T) {
	report := writeFile(t, "bench.txt", benchTxt)
	// 20 us budget: crossing between 261.7k (12.0 us) and 1.31M (35.7 us)
	// events/s, at 261686 + 7.98/23.631*1046745 = 615.2k.
	checkPlan(t, []string{"-from-report", report, "-quick", "-vm-rate", "1000", "-headroom", "0"},
		"rate within the budget (p99 <= 20µs): 615.2k events/s", "load=50%", "1.0k events/s per VM")
}

// TestPlanTrace records a short trace and plans its workload on a saved curve.
func TestPlanTrace(t *testing.T) {
	tr := filepath.Join(t.TempDir(), "run.trace")
	if code, _, stderr := runMain("record", "-o", tr, "-events", "1000", "-duration", "2m", "-vms", "2", "-rate", "2000"); code != 0 {
		t.Fatalf("record: exit %d: %s", code, stderr)
	}
	checkPlan(t, []string{"-trace", tr, "-from-report", writeFile(t, "bench.txt", benchTxt), "-vcpus", "4"},
		"trace "+tr, "distinct table pages", "2 VMs", "4 vCPUs")
}

// TestPlanProm plans from a real scrape of the engine's registry.
func TestPlanProm(t *testing.T) {
	e, err := engine.New(engine.Config{Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	reg := prometheus.NewRegistry()
	if err := e.Register(reg); err != nil {
		t.Fatal(err)
	}
	reg.MustRegister(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	s, err := sim.New(sim.Config{VMs: 3, Rate: 2000, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	// Snapshot once every VM has submitted events (not after a sleep).
	h := &eventsHost{Host: e, want: 100, vms: 3, ready: make(chan struct{}), seen: map[vasmon.VMID]int{}}
	go func() { done <- s.Run(ctx, h, backends.Request{Monitored: backends.DefaultMonitored}) }()
	select {
	case <-h.ready:
	case err := <-done:
		t.Fatalf("the simulation ended first: %v", err)
	}
	mfs, err := reg.Gather()
	cancel()
	<-done
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		if err := enc.Encode(mf); err != nil {
			t.Fatal(err)
		}
	}
	prom := writeFile(t, "metrics.txt", buf.String())
	out := checkPlan(t, []string{"-prom", prom, "-from-report", writeFile(t, "bench.txt", benchTxt)},
		"Prometheus snapshot", "over the process's uptime", "a snapshot has no bursts")
	if !strings.Contains(out, "busiest of 3 VMs") {
		t.Fatalf("the snapshot's 3 VMs are not in the workload:\n%s", out)
	}
}

// TestPlanUsageErrors: bad input ends with one line on stderr and exit
// status 2, before anything is measured.
func TestPlanUsageErrors(t *testing.T) {
	dir := t.TempDir()
	report := writeFile(t, "bench.txt", benchTxt)
	noPoints := writeFile(t, "empty.txt", "PASS\nok  github.com/vasengine/vasengine/bench 1.0s\n")
	notTrace := writeFile(t, "not.trace", "hello, world")
	notProm := writeFile(t, "not.prom", "{{{ not an exposition")
	for _, args := range [][]string{
		{"-profile", "nope"},
		{"-budget", "0"},
		{"-budget", "-5us"},
		{"-headroom", "1"},
		{"-headroom", "-0.1"},
		{"-vm-rate", "0"},
		{"-vcpus", "0"},
		{"-vms", "0"},
		{"-shards", "0"},
		{"-queue-depth", "1"},
		{"-step", "0s"},
		{"-vm-burst", "-1"},
		{"-vm-burst", "NaN"},
		{"-vm-rate", "+Inf"},
		{"-vm-rate", "NaN"},
		{"-mem", "lots"},
		{"-mem", "8XB"},
		{"-from-report", filepath.Join(dir, "missing.txt")},
		{"-from-report", noPoints},
		{"-from-report", dir},
		{"-trace", filepath.Join(dir, "missing.trace")},
		{"-trace", notTrace},
		{"-prom", filepath.Join(dir, "missing.prom")},
		{"-prom", notProm},
		{"-prom", notProm, "-trace", notTrace},
		{"-prom-time", "2026-01-01T00:00:00Z"},
		{"-trace", notTrace, "-vm-rate", "5"},
		{"-from-report", report, "-plot", filepath.Join(dir, "no", "such", "plan.svg")},
		{"-nosuchflag"},
		{"extra-argument"},
	} {
		start := time.Now()
		all := append([]string{"plan"}, args...)
		code, out, stderr := runMain(all...)
		if out != "" {
			t.Errorf("plan %v: stdout %q", args, out)
		}
		usageFailure(t, all, code, stderr)
		if d := time.Since(start); d > time.Second {
			t.Errorf("plan %v: the error took %v (measured first?)", args, d)
		}
	}
}

// invertedTxt is the committed bench.txt's 2-shard latency curve of
// 54f9171: p99 21 ms at 10% load, 3.4 ms at 90%.
const invertedTxt = `BenchmarkLatency/shards=2/load=10%-2  1345231  895.4 ns/op  1124235 offered-events/s  56.61 over-budget-%  1966079 p50-ns  20971519 p99-ns  24117247 p999-ns
BenchmarkLatency/shards=2/load=30%-2  4005391  298.3 ns/op  3372704 offered-events/s  60.24 over-budget-%  1572863 p50-ns  9437183 p99-ns  9437183 p999-ns
BenchmarkLatency/shards=2/load=50%-2  6598020  179.7 ns/op  5621173 offered-events/s  80.19 over-budget-%  2228223 p50-ns  5505023 p99-ns  6553599 p999-ns
BenchmarkLatency/shards=2/load=90%-2  11468778  117.1 ns/op  10118112 offered-events/s  92.72 over-budget-%  1507327 p50-ns  3407871 p99-ns  6553599 p999-ns
BenchmarkStartMonitor/engine-2  128  9964738 ns/op  4264 bytes/table  412141 tables/s
`

// TestPlanInvertedCurve: a curve whose latency falls as the load rises is
// said to be a measurement problem; when no VM fits, the plan says which
// budgets would fit how many.
func TestPlanInvertedCurve(t *testing.T) {
	report := writeFile(t, "bench.txt", invertedTxt)
	code, out, stderr := runMain("plan", "-from-report", report, "-shards", "2", "-vm-rate", "1000", "-vm-burst", "100", "-mem", "1GiB", "-budget", "10ms")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"WARNING: the curve is not monotone", "p99 20.97ms at 1.12M events/s (load=10%), then 9.44ms at 3.37M events/s (load=30%)",
		"not to be trusted", "plan: no VM fits within the budget of 10ms", "a budget of 20.97ms would fit"} {
		if !strings.Contains(out, want) {
			t.Errorf("the plan lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(stderr, "warning: the cost curve is not monotone") {
		t.Errorf("no warning on stderr: %q", stderr)
	}
}

// TestPlanPromSnapshotLatency: a snapshot whose own p99 is over a second
// is not planned from the curve alone: its measurement is a point of the
// curve, and the contradiction is said.
func TestPlanPromSnapshotLatency(t *testing.T) {
	snap := `# TYPE process_start_time_seconds gauge
process_start_time_seconds 1.7e+09
# TYPE vasengine_vms gauge
vasengine_vms 2
# TYPE vasengine_hooked_tables gauge
vasengine_hooked_tables 200
# TYPE vasengine_table_host_bytes gauge
vasengine_table_host_bytes 1e+06
# TYPE vasengine_vm_events_submitted_total counter
vasengine_vm_events_submitted_total{vm="1"} 300000
vasengine_vm_events_submitted_total{vm="2"} 300000
# TYPE vasengine_callback_latency_seconds histogram
vasengine_callback_latency_seconds_bucket{le="0.001"} 10
vasengine_callback_latency_seconds_bucket{le="1"} 900
vasengine_callback_latency_seconds_bucket{le="+Inf"} 1000
vasengine_callback_latency_seconds_sum 2000
vasengine_callback_latency_seconds_count 1000
`
	prom := writeFile(t, "snap.prom", snap)
	report := writeFile(t, "bench.txt", benchTxt)
	code, out, stderr := runMain("plan", "-prom", prom, "-prom-time", "1700000100", "-from-report", report, "-budget", "10ms", "-mem", "1GiB")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"the snapshot measured p99 1.00s (beyond the histogram's last bucket) over 1000 callbacks at its mean load of 6.0k events/s",
		"CONTRADICTS the cost curve", "plan: no VM fits within the budget of 10ms"} {
		if !strings.Contains(out, want) {
			t.Errorf("the plan lacks %q:\n%s", want, out)
		}
	}
}

// TestPlanNoPlotUnlessAsked: plan writes no file unless -plot is given.
func TestPlanNoPlotUnlessAsked(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	report := writeFile(t, "bench.txt", benchTxt)
	code, out, stderr := runMain("plan", "-from-report", report, "-vm-rate", "1000", "-vm-burst", "100", "-mem", "1GiB")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 || strings.Contains(out, "plot:") {
		t.Fatalf("files written without -plot: %v\n%s", entries, out)
	}
	if code, _, stderr := runMain("plan", "-from-report", report, "-vm-rate", "1000", "-vm-burst", "100", "-mem", "1GiB", "-plot", "/dev/full"); code != 1 || !strings.Contains(stderr, "-plot") {
		t.Fatalf("-plot /dev/full: exit %d, %q", code, stderr)
	}
}

// eventsHost closes ready once vms VMs have each submitted want events.
type eventsHost struct {
	engine.Host
	want, vms int
	mu        sync.Mutex
	seen      map[vasmon.VMID]int
	ready     chan struct{}
	closed    bool
}

func (h *eventsHost) Submit(vm vasmon.VMID, evs []shard.Event) (int, error) {
	n, err := h.Host.Submit(vm, evs)
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.seen[vm] < h.want && h.seen[vm]+n >= h.want {
		h.vms--
	}
	h.seen[vm] += n
	if h.vms == 0 && !h.closed {
		h.closed = true
		close(h.ready)
	}
	return n, err
}

// TestPlanSync plans synchronous roots: the simulated guests' stores are
// synchronous and the curve is made of stalls (latencyOf), said in the
// report; the verify command keeps -sync.
func TestPlanSync(t *testing.T) {
	// (What fits depends on the host and its load: a loaded host may fit
	// none, and then there is no verify command to check.)
	out := checkPlan(t, []string{"-sync", "-quick", "-vms", "2", "-budget", "1s", "-mem", "1GiB"},
		"-sync: every store of the simulated guests synchronous", "stall the engine adds to the writing vCPU")
	if strings.Contains(out, "\nverify: vasengine plan") && !strings.Contains(out, " -sync ") {
		t.Fatalf("the verify command lacks -sync:\n%s", out)
	}
	f := planFlags{sync: true, profile: "web"}
	if c := f.verifyCommand(plan.Promise{VMs: 1}); !strings.Contains(c, " -sync") {
		t.Errorf("verify command %q lacks -sync", c)
	}
	for _, args := range [][]string{{"-sync", "-trace", "x.trace"}, {"-sync", "-prom", "x.prom"}, {"-sync", "-from-report", "x.txt"}} {
		if code, _, stderr := runMain(append([]string{"plan"}, args...)...); code != 2 || !strings.Contains(stderr, "-sync") {
			t.Errorf("plan %v: exit %d, %q: want a usage error about -sync", args, code, stderr)
		}
	}
}

// TestLatencyOf: a plan's latencies are trap-to-callback, or with -sync
// the synchronous stalls, each as the difference of two snapshots.
func TestLatencyOf(t *testing.T) {
	var lat, stall shard.Histogram
	var a, b engine.Stats
	lat.Record(1_000)
	stall.Record(1_000)
	lat.Snapshot(&a.Latency)
	stall.Snapshot(&a.SyncStall)
	for range 10 {
		lat.Record(2_000)
		stall.Record(500_000)
	}
	lat.Snapshot(&b.Latency)
	stall.Snapshot(&b.SyncStall)
	l, s := latencyOf(&a, &b, false), latencyOf(&a, &b, true)
	if l.Count() != 10 || s.Count() != 10 {
		t.Fatalf("counts %d and %d, want the 10 values between the snapshots", l.Count(), s.Count())
	}
	if p := l.Quantile(0.99); p < 2_000 || p > 4_000 {
		t.Errorf("trap-to-callback p99 %d ns, want about 2 us", p)
	}
	if p := s.Quantile(0.99); p < 500_000 || p > 1_000_000 {
		t.Errorf("stall p99 %d ns, want about 500 us", p)
	}
}

// TestPlanShardsSweep plans with every shard count this process may use
// and keeps the fewest shards that fit the most VMs, said in the report;
// the verify command uses that count.
func TestPlanShardsSweep(t *testing.T) {
	out := checkPlan(t, []string{"-shards-sweep", "-quick", "-vms", "2", "-budget", "1s", "-mem", "1GiB"},
		"-shards-sweep: 1 shards: ", "the fewest that fit the most VMs")
	i := strings.Index(out, "planned with ")
	j := strings.Index(out, "\nhost: ")
	if i < 0 || j < 0 {
		t.Fatalf("no sweep answer or host line:\n%s", out)
	}
	var n int
	if _, err := fmt.Sscanf(out[i:], "planned with %d shards", &n); err != nil || n < 1 {
		t.Fatalf("sweep answer %q: %v", out[i:min(len(out), i+40)], err)
	}
	// (A loaded host may fit no VM: then there is no verify command.)
	verifies := strings.Contains(out, "\nverify: vasengine plan")
	if !strings.HasPrefix(out[j:], fmt.Sprintf("\nhost: %d shards", n)) || verifies && !strings.Contains(out, fmt.Sprintf(" -shards %d ", n)) {
		t.Fatalf("the plan does not use the %d shards the sweep chose:\n%s", n, out)
	}
	for _, args := range [][]string{{"-shards-sweep", "-shards", "2"}, {"-shards-sweep", "-from-report", "x.txt"}} {
		if code, _, stderr := runMain(append([]string{"plan"}, args...)...); code != 2 || !strings.Contains(stderr, "-shards-sweep") {
			t.Errorf("plan %v: exit %d, %q: want a usage error about -shards-sweep", args, code, stderr)
		}
	}
}
