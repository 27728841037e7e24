package main

import (
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/vasengine/vasengine/plan"
)

// fastTxt is a fake saved bench output: a curve claiming p99 500 ns up to
// 2 M events/s, far below what the engine does anywhere (trap-to-callback
// includes the simulator's batching of up to 20 us). A plan on it promises
// a budget of 1 us that no run keeps.
const fastTxt = `BenchmarkLatency/load=10%-2   200000   3828 ns/op   200000 offered-events/s   0 over-budget-%   200 p50-ns   500 p99-ns   700 p999-ns
BenchmarkLatency/load=90%-2   200000    884 ns/op  2000000 offered-events/s   0 over-budget-%   200 p50-ns   500 p99-ns   700 p999-ns
`

// verifyLine returns the verify command a plan printed, as arguments of
// Main (without "vasengine").
func verifyLine(t *testing.T, out string) []string {
	t.Helper()
	m := regexp.MustCompile(`(?m)^verify: vasengine (plan -verify .*)$`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no verify command under the answer:\n%s", out)
	}
	return strings.Fields(m[1])
}

// TestPlanVerifyBreaksBudget: a plan made on a curve that lies about the
// engine (fastTxt) promises p99 <= 1 us; its verify run measures the
// engine's real latency, breaks the promise and exits 1, both through
// plan -verify and through the verify command the plan printed.
func TestPlanVerifyBreaksBudget(t *testing.T) {
	report := writeFile(t, "fast.txt", fastTxt)
	args := []string{"plan", "-from-report", report, "-budget", "1us", "-vm-rate", "200000", "-vcpus", "1", "-vm-burst", "64",
		"-mem", "1GiB", "-quick", "-verify", "-verify-duration", "300ms"}
	code, out, stderr := runMain(args...)
	if code != 1 {
		t.Fatalf("plan -verify on a lying curve: exit %d, want 1\n%s%s", code, out, stderr)
	}
	// 2 M events/s x 0.8 / 200 k = 8 VMs, bound by cpu.
	for _, want := range []string{"plan: 8 VMs (8 vCPUs), bound by cpu", "predicted at 8 VMs: 1.60M events/s; p50 200ns, p99 500ns",
		"BROKEN: over the budget", "verify: FAILED: the run broke the plan's promise ("} {
		if !strings.Contains(out, want) {
			t.Errorf("the output lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(stderr, "vasengine: verify: the run broke the plan's promise: ") || !strings.Contains(stderr, "p99: over the budget") {
		t.Errorf("stderr does not say why it failed: %q", stderr)
	}
	// The printed command verifies the same promise without planning.
	cmd := verifyLine(t, out)
	code, out2, stderr2 := runMain(cmd...)
	if code != 1 || !strings.Contains(out2, "p99           500ns") && !strings.Contains(out2, "500ns") {
		t.Fatalf("%v: exit %d, want 1 with the promise's prediction\n%s%s", cmd, code, out2, stderr2)
	}
	if strings.Contains(out2, "cost curve:") {
		t.Errorf("the verify command planned again:\n%s", out2)
	}
}

// TestPlanVerifyTightBudget: a promise whose budget no callback can meet
// (1 ns: a callback starts after its trap was stamped, batched and
// queued) is broken by its run: exit 1, the p99 row says so.
func TestPlanVerifyTightBudget(t *testing.T) {
	pr := plan.Promise{VMs: 2, VCPUs: 1, RatePerVM: 2000, Events: 4000, P50: 1, P99: 1, P999: 1, QueueHave: 1 << 20, MemHave: 1 << 30}
	code, out, stderr := runMain("plan", "-verify", "-verify-duration", "200ms", "-profile", "build", "-budget", "1ns", "-promise", pr.String())
	if code != 1 {
		t.Fatalf("exit %d, want 1\n%s%s", code, out, stderr)
	}
	if !regexp.MustCompile(`(?m)^ +p99 .*BROKEN: over the budget`).MatchString(out) {
		t.Errorf("the p99 row is not broken:\n%s", out)
	}
}

// TestPlanVerifyKept: a promise the run can keep (a budget of 10 s, a low
// rate and half of it promised, so that a loaded host's pacing does not
// break it; ample queues and memory) exits 0, and every constraint is in
// the table with a measured figure.
func TestPlanVerifyKept(t *testing.T) {
	pr := plan.Promise{VMs: 2, VCPUs: 1, RatePerVM: 2000, Events: 2000, P50: 1000, P99: 5000, P999: 9000,
		QueuePeak: 200, QueueHave: 1 << 20, BytesPerTable: 4096, MemBytes: 1 << 20, MemHave: 1 << 30}
	code, out, stderr := runMain("plan", "-verify", "-verify-duration", "300ms", "-budget", "10s", "-promise", pr.String())
	if code != 0 {
		t.Fatalf("exit %d, want 0\n%s%s", code, out, stderr)
	}
	for _, row := range []string{"events/s", "p50", "p99", "p99.9", "queue peak", "bytes per table", "table memory"} {
		if !regexp.MustCompile(`(?m)^ +` + regexp.QuoteMeta(row) + ` +\S`).MatchString(out) {
			t.Errorf("no %q row:\n%s", row, out)
		}
	}
	if !strings.Contains(out, "verify: the run kept the plan's promise") || !strings.Contains(stderr, "2 simulated VMs x 1 vCPUs, profile web") {
		t.Errorf("no verdict or no workload line:\n%s%s", out, stderr)
	}
	if m := regexp.MustCompile(`table memory +1\.0 MiB +(\S+) (\S+) \((\d+) tables\)`).FindStringSubmatch(out); m == nil || m[3] == "0" {
		t.Errorf("no tables measured: %v\n%s", m, out)
	}
}

// TestPlanAtScale: the cost curve is runs of the workload at VM counts
// (here doubling from 1, the budget never crossed), the planned VMs are
// measured, and the verify command is under the answer.
func TestPlanAtScale(t *testing.T) {
	// -quick's 150 ms points, at most 4 runs; the final run of the planned
	// VMs is 4 points long.
	code, out, stderr := runMain("plan", "-quick", "-vms", "1", "-vcpus", "1", "-vm-rate", "2000", "-budget", "10s", "-mem", "1GiB",
		"-scale-runs", "4", "-vm-burst", "20000", "-queue-depth", "65536", "-shards", "1")
	if code != 0 {
		t.Fatalf("exit %d\n%s%s", code, out, stderr)
	}
	// Queues: 65536 x 0.8 / 20000 = 2 VMs, so measuring beyond 3 VMs is
	// useless; the search measures 1, 2 (doubling), 3 (the limit), all
	// within the budget: cpu admits floor(3 x 0.8) = 2; then the planned 2
	// for the verify run's length.
	for _, n := range []string{"1", "2", "3"} {
		if !regexp.MustCompile(`(?m)^ +` + n + ` VMs +\d`).MatchString(out) {
			t.Errorf("no curve point of %s VMs:\n%s", n, out)
		}
	}
	for _, want := range []string{"measured now at the plan's scale", "plan: 2 VMs (2 vCPUs), bound by",
		"predicted at 2 VMs: 4.0k events/s", "verify: vasengine plan -verify -verify-duration 3s -profile web -shards 1 -queue-depth 65536"} {
		if !strings.Contains(out, want) {
			t.Errorf("the output lacks %q:\n%s", want, out)
		}
	}
	if n := strings.Count(stderr, "plan: 2 VMs"); n != 2 {
		t.Errorf("2 VMs measured %d times, want 2 (the step, then the verify length):\n%s", n, stderr)
	}
	pr, err := plan.ParsePromise(verifyLine(t, out)[len(verifyLine(t, out))-1])
	if err != nil || pr.VMs != 2 || pr.VCPUs != 1 || pr.RatePerVM != 2000 || pr.P99 == 0 || pr.MemBytes == 0 {
		t.Errorf("the printed promise %+v: %v", pr, err)
	}
}

// TestPlanVerifyUsageErrors: bad -verify input is a usage error (exit 2)
// before anything runs.
func TestPlanVerifyUsageErrors(t *testing.T) {
	ok := plan.Promise{VMs: 2, VCPUs: 1, RatePerVM: 2000}.String()
	dir := t.TempDir()
	for _, args := range [][]string{
		{"-verify-duration", "0s", "-verify"},
		{"-verify-duration", "1s"},
		{"-promise", ok},
		{"-verify", "-promise", "vms=2"},
		{"-verify", "-promise", "nonsense"},
		{"-verify", "-promise", strings.Replace(ok, "vms=2", "vms=0", 1)},
		{"-verify", "-promise", strings.Replace(ok, "vms=2", "vms=5000", 1)},
		{"-verify", "-promise", strings.Replace(ok, "vcpus=1", "vcpus=500", 1)},
		{"-verify", "-promise", strings.Replace(ok, "rate=2000", "rate=-1", 1)},
		{"-verify", "-promise", ok + ",vms=3"},
		{"-verify", "-promise", ok + ",color=blue"},
		{"-verify", "-promise", strings.Replace(ok, "p99=0ns", "p99=soon", 1)},
		{"-verify", "-promise", ok, "-trace", filepath.Join(dir, "missing.trace")},
		{"-scale-runs", "0"},
	} {
		all := append([]string{"plan"}, args...)
		code, out, stderr := runMain(all...)
		if out != "" {
			t.Errorf("%v: stdout %q", args, out)
		}
		usageFailure(t, all, code, stderr)
	}
}

// TestPlanTraceAtScale: a trace's workload is measured at scale as copies
// of the trace replayed at its recorded pace, and verified the same way.
func TestPlanTraceAtScale(t *testing.T) {
	tr := filepath.Join(t.TempDir(), "run.trace")
	if code, _, stderr := runMain("record", "-o", tr, "-events", "2000", "-duration", "2m", "-vms", "2", "-rate", "2000"); code != 0 {
		t.Fatalf("record: exit %d: %s", code, stderr)
	}
	code, out, stderr := runMain("plan", "-trace", tr, "-quick", "-vms", "4", "-vcpus", "1", "-budget", "10s", "-vm-burst", "100",
		"-mem", "1GiB", "-scale-runs", "2", "-verify", "-verify-duration", "300ms")
	// A looped replay's rate over 150 to 300 ms windows is uneven (each
	// loop starts its VMs again): a verify run may fall short of the rate
	// measured while planning. Nothing else may break with a 10 s budget.
	if code != 0 && !(code == 1 && strings.HasSuffix(stderr, "the run broke the plan's promise: events/s: the host did not sustain the planned load\n")) {
		t.Fatalf("exit %d\n%s%s", code, out, stderr)
	}
	for _, want := range []string{"copies of the trace " + tr + " (2 VMs each) at its recorded pace, looped", "verify: vasengine plan -verify -verify-duration 300ms -trace " + tr,
		"VMs x 1 vCPUs at ", "queue peak", "table memory"} {
		if !strings.Contains(out, want) && !strings.Contains(stderr, want) {
			t.Errorf("the output lacks %q:\n%s%s", want, out, stderr)
		}
	}
	// 4 planned VMs are 2 copies of the trace's 2 VMs.
	if !strings.Contains(stderr, "plan: 4 VMs") {
		t.Errorf("4 VMs not measured:\n%s", stderr)
	}
}
