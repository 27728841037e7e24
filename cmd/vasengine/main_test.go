package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/trace"
)

func runMain(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := Main(args, &out, &errb)
	return code, out.String(), errb.String()
}

// usageFailure checks a usage error: exit status 2 and exactly two lines on
// stderr, what is wrong and the hint naming the command's -h.
func usageFailure(t *testing.T, args []string, code int, stderr string) {
	t.Helper()
	if code != 2 {
		t.Errorf("%v: exit %d, want 2 (stderr %q)", args, code, stderr)
		return
	}
	lines := strings.Split(strings.TrimSuffix(stderr, "\n"), "\n")
	cmd := "help"
	if len(args) > 0 && args[0] != "bogus" {
		cmd = args[0] + " -h"
	}
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "vasengine: ") || lines[1] != fmt.Sprintf("run 'vasengine %s' for usage", cmd) &&
		!(cmd == "help" && lines[1] == "run 'vasengine help' for the commands") {
		t.Errorf("%v: stderr is not one line of error and one hint line:\n%s", args, stderr)
	}
}

// TestUsageErrors: bad flags and impossible configurations end with one
// line saying what is wrong, one hint line and exit status 2, never a
// panic nor the flag package's usage dump, and before anything runs.
func TestUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{"bogus"},
		{"run", "-shards", "0"},
		{"run", "-shards", "-3"},
		{"run", "-shards", "800"},
		{"run", "-shards", "1000"},
		{"run", "-shards", fmt.Sprint(shardLimit() + 1)},
		{"run", "-budget", "0"},
		{"run", "-budget", "-1s"},
		{"run", "-cpus", "4095"},
		{"run", "-cpus", "3-1"},
		{"run", "-cpus", "x"},
		{"run", "-profile", "nope"},
		{"run", "-backend", "nope"},
		{"run", "-duration", "0s"},
		{"run", "-vms", "0"},
		{"run", "-vms", "1025"},
		{"run", "-vms", "1000000"},
		{"run", "-vcpus", "0"},
		{"run", "-vcpus", "100000"},
		{"run", "-processes", "1000000"},
		{"run", "-queue-depth", "1"},
		{"run", "-queue-depth", "99999999"},
		{"run", "-batch", "0"},
		{"run", "-batch", "100000"},
		{"run", "-spin", "-1s"},
		{"run", "-spin", "1h"},
		{"run", "-mode", "7-level"},
		{"run", "-rate", "-5"},
		{"run", "-rate", "NaN"},
		{"run", "-rate", "+Inf"},
		{"run", "-burst", "soon"},
		{"run", "-top", "-1"},
		{"run", "-nosuchflag"},
		{"run", "-vms", "many"},
		{"run", "extra-argument"},
		{"run", "-listen", "256.1.1.1:99999"},
		{"run", "-memprofile", filepath.Join(t.TempDir(), "no", "such", "mem.pprof")},
		{"run", "-cpuprofile", t.TempDir()},
		{"run", "-metrics-out", filepath.Join(t.TempDir(), "no", "metrics.txt")},
		{"run", "-backend", "replay"},
		{"run", "-backend", "replay", "-trace", filepath.Join(t.TempDir(), "none")},
		{"run", "-backend", "replay", "-trace", "x", "-speed", "NaN"},
		{"run", "-backend", "replay", "-trace", "x", "-speed", "1e300"},
		{"replay", "-speed", "-1", "x"},
		{"run", "-backend", "kvm", "-vms", "2000"},
		{"run", "-backend", "qemu", "-guests", "0"},
		{"run", "-backend", "qemu", "-guests", "1025"},
		{"run", "-backend", "qemu", "-workload", "nope"},
		{"record", "-o", filepath.Join(t.TempDir(), "t.vtr"), "-backend", "qemu", "-sync"},
		{"record"},
		{"record", "-o", t.TempDir()},
		{"replay"},
		{"replay", "a", "b"},
		{"replay", "-duration", "0s", "x"},
		{"replay", filepath.Join(t.TempDir(), "none")},
		{"replay", t.TempDir()},
	} {
		start := time.Now()
		code, _, stderr := runMain(args...)
		usageFailure(t, args, code, stderr)
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("%v: the usage error took %v: something ran first", args, d)
		}
	}
}

// TestQueueMemoryLimit: queues that would take more than half of the
// memory available are refused before anything starts.
func TestQueueMemoryLimit(t *testing.T) {
	defer func(f func() int64) { memAvailable = f }(memAvailable)
	memAvailable = func() int64 { return 1 << 30 }
	args := []string{"run", "-shards", "1", "-queue-depth", "16777216"} // 1 GiB of slots
	code, _, stderr := runMain(args...)
	usageFailure(t, args, code, stderr)
	if !strings.Contains(stderr, "memory") {
		t.Fatalf("the error does not say memory: %q", stderr)
	}
	args = []string{"run", "-vms", "1024"} // 1 GiB of simulated VMs
	code, _, stderr = runMain(args...)
	usageFailure(t, args, code, stderr)
}

// TestEngineVMLimit: the command's VM limit is what the engine enforces.
func TestEngineVMLimit(t *testing.T) {
	e, err := engine.New(engine.Config{Shards: 1, MaxVMs: maxVMs})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if e.Config().MaxVMs != maxVMs {
		t.Fatalf("engine MaxVMs %d, the command checks %d", e.Config().MaxVMs, maxVMs)
	}
}

// TestCPUsPin: -cpus pins the shard workers to those CPUs (the engine
// leaves them unpinned unless Config.Pin); without it they are unpinned.
func TestCPUsPin(t *testing.T) {
	allowed, err := shard.AllowedCPUs()
	if err != nil || len(allowed) == 0 {
		t.Skipf("no allowed CPU set: %v", err)
	}
	for _, args := range [][]string{nil, {"-cpus", strconv.Itoa(allowed[0])}} {
		var f engineFlags
		fs := flag.NewFlagSet("run", flag.ContinueOnError)
		f.register(fs)
		if err := fs.Parse(append(args, "-shards", "1")); err != nil {
			t.Fatal(err)
		}
		c, err := f.config()
		if err != nil {
			t.Fatal(err)
		}
		if want := args != nil; c.Pin != want || want && !slices.Equal(c.CPUs, allowed[:1]) {
			t.Fatalf("%v: Pin %v, CPUs %v", args, c.Pin, c.CPUs)
		}
		e, err := engine.New(c)
		if err != nil {
			t.Fatal(err)
		}
		cpu, pinErrs := e.Shards()[0].CPU(), e.PinErrors()
		e.Close()
		switch {
		case args == nil && cpu != -1:
			t.Fatalf("no -cpus: the worker is pinned to CPU %d", cpu)
		case args != nil && cpu != allowed[0] && len(pinErrs) == 0:
			t.Fatalf("%v: the worker is pinned to CPU %d, want %d", args, cpu, allowed[0])
		}
	}
}

// TestHelp: -h lists the flags on stdout and exits 0; no arguments print
// the usage on stderr and exit 2 (without running anything); help and
// version exit 0.
func TestHelp(t *testing.T) {
	for _, cmd := range []string{"run", "record", "replay", "plan"} {
		code, out, stderr := runMain(cmd, "-h")
		if code != 0 || !strings.Contains(out, "-shards") || stderr != "" {
			t.Errorf("%s -h: exit %d, stdout %q, stderr %q", cmd, code, out, stderr)
		}
	}
	start := time.Now()
	code, out, stderr := runMain()
	if code != 2 || out != "" || !strings.Contains(stderr, "usage: vasengine <command>") || time.Since(start) > time.Second {
		t.Errorf("no arguments: exit %d after %v, stdout %q, stderr %q", code, time.Since(start), out, stderr)
	}
	for _, args := range [][]string{{"help"}, {"-h"}} {
		if code, out, _ := runMain(args...); code != 0 || !strings.Contains(out, "exit status") {
			t.Errorf("%v: exit %d, %q", args, code, out)
		}
	}
}

// TestVersion: version and -version name the program, its revision (when
// known) and Go's version.
func TestVersion(t *testing.T) {
	for _, args := range [][]string{{"version"}, {"-version"}, {"--version"}} {
		code, out, _ := runMain(args...)
		if code != 0 || !strings.HasPrefix(out, "vasengine ") || !strings.Contains(out, "go1.") {
			t.Errorf("%v: exit %d, %q", args, code, out)
		}
	}
	// A binary built as `make build` builds it names its revision.
	bin := filepath.Join(t.TempDir(), "vasengine")
	rev := "0123456789abcdef0123456789abcdef01234567"
	if out, err := exec.Command("go", "build", "-ldflags", "-X main.buildRevision="+rev+"-dirty", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "version").Output()
	if err != nil || !strings.Contains(string(out), "revision "+rev+" (modified)") {
		t.Fatalf("version: %q, %v", out, err)
	}
}

// failWriter fails every write.
type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

// TestOutputErrors: every output that cannot be written (stdout, the
// trace, the profiles, the final metrics) ends the command with exit 1
// and a message naming it (issue 13 item 1).
func TestOutputErrors(t *testing.T) {
	if _, err := os.Stat("/dev/full"); err != nil {
		t.Skip("no /dev/full")
	}
	var errb bytes.Buffer
	if code := Main([]string{"run", "-duration", "300ms", "-vms", "1"}, failWriter{}, &errb); code != 1 || !strings.Contains(errb.String(), "disk full") {
		t.Errorf("summary to a failing stdout: exit %d, stderr %q", code, errb.String())
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"record", "-o", "/dev/full"}, "/dev/full"},
		{[]string{"run", "-cpuprofile", "/dev/full"}, "-cpuprofile"},
		{[]string{"run", "-memprofile", "/dev/full"}, "profile"},
		{[]string{"run", "-blockprofile", "/dev/full"}, "profile"},
		{[]string{"run", "-metrics-out", "/dev/full"}, "-metrics-out"},
	} {
		args := append(c.args, "-duration", "1s", "-vms", "2", "-rate", "20000")
		code, _, stderr := runMain(args...)
		last := strings.TrimSpace(stderr)
		last = last[strings.LastIndex(last, "\n")+1:]
		if code != 1 || !strings.Contains(last, c.want) || !strings.Contains(last, "no space left") {
			t.Errorf("%v: exit %d, last stderr line %q (want exit 1 naming %s and ENOSPC)", args, code, last, c.want)
		}
	}
}

// TestRunSim: the default job on the simulator prints the summary and
// accounts for every event.
func TestRunSim(t *testing.T) {
	code, out, stderr := runMain("run", "-events", "20000", "-duration", "2m", "-vms", "3", "-rate", "5000")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"total", "relevant", "p99 <=", "over budget", "trap-to-callback latency: p50", "bytes per table"} {
		if !strings.Contains(out, want) {
			t.Fatalf("summary lacks %q:\n%s", want, out)
		}
	}
	var sub, proc, rej uint64
	for _, l := range strings.Split(out, "\n") {
		if i := strings.Index(l, "submitted "); i >= 0 {
			fmt.Sscanf(l[i:], "submitted %d = processed %d + rejected %d", &sub, &proc, &rej)
		}
	}
	if sub == 0 || sub != proc+rej {
		t.Fatalf("accounting line: submitted %d processed %d rejected %d\n%s", sub, proc, rej, out)
	}
	if !strings.Contains(stderr, "events/s") {
		t.Fatalf("no progress lines on stderr: %q", stderr)
	}
}

func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestPrometheusScrape starts a real Prometheus server (Debian's package,
// installed by scripts/prometheus-setup.sh when missing), lets it scrape
// `vasengine run`, and checks through its HTTP query API that the engine's
// series are there with plausible values; then stops the run with SIGINT
// and checks the graceful drain printed the summary.
func TestPrometheusScrape(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIPPED LOUDLY: -short skips the Prometheus integration test")
	}
	if _, err := exec.LookPath("prometheus"); err != nil {
		out, err := exec.Command("bash", "../../scripts/prometheus-setup.sh").CombinedOutput()
		if err != nil {
			t.Skipf("SKIPPED LOUDLY: no prometheus binary and scripts/prometheus-setup.sh failed: %v\n%s", err, out)
		}
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "vasengine")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	engineAddr, promAddr := freePort(t), freePort(t)
	var runOut, runErr bytes.Buffer
	run := exec.Command(bin, "run", "-duration", "2m", "-vms", "3", "-rate", "5000", "-shards", "2", "-listen", engineAddr)
	run.Stdout, run.Stderr = &runOut, &runErr
	if err := run.Start(); err != nil {
		t.Fatal(err)
	}
	defer run.Process.Kill()
	cfg := fmt.Sprintf("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: vasengine\n    static_configs:\n      - targets: ['%s']\n", engineAddr)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	prom := exec.Command("prometheus", "--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+promAddr, "--log.level=warn")
	var promErr bytes.Buffer
	prom.Stderr = &promErr
	if err := prom.Start(); err != nil {
		t.Fatal(err)
	}
	defer prom.Process.Kill()

	query := func(q string) (float64, bool) {
		resp, err := http.Get("http://" + promAddr + "/api/v1/query?query=" + url.QueryEscape(q))
		if err != nil {
			return 0, false
		}
		defer resp.Body.Close()
		var r struct {
			Status string
			Data   struct {
				Result []struct{ Value []any }
			}
		}
		if json.NewDecoder(resp.Body).Decode(&r) != nil || r.Status != "success" || len(r.Data.Result) == 0 {
			return 0, false
		}
		s, _ := r.Data.Result[0].Value[1].(string)
		v, err := strconv.ParseFloat(s, 64)
		return v, err == nil
	}
	checks := []struct {
		q  string
		ok func(float64) bool
	}{
		{`up{job="vasengine"}`, func(v float64) bool { return v == 1 }},
		{`vasengine_shards`, func(v float64) bool { return v == 2 }},
		{`vasengine_vms`, func(v float64) bool { return v == 3 }},
		{`vasengine_latency_budget_seconds`, func(v float64) bool { return v == 20e-6 }},
		{`vasengine_hooked_tables`, func(v float64) bool { return v > 0 }},
		{`vasengine_table_host_bytes / vasengine_hooked_tables`, func(v float64) bool { return v > 4096 && v < 64<<10 }},
		{`sum(rate(vasengine_events_total[5s]))`, func(v float64) bool { return v > 1000 }},
		{`vasengine_events_submitted_total - vasengine_events_rejected_total`, func(v float64) bool { return v > 0 }},
		{`sum(vasengine_callback_latency_seconds_count)`, func(v float64) bool { return v > 0 }},
		{`count(vasengine_vm_events_submitted_total)`, func(v float64) bool { return v == 3 }},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// Prometheus scrapes every second: query again at each of its scrapes.
	scrapes := time.NewTicker(500 * time.Millisecond)
	defer scrapes.Stop()
	for _, c := range checks {
		for {
			if v, ok := query(c.q); ok && c.ok(v) {
				break
			}
			if ctx.Err() != nil {
				v, ok := query(c.q)
				t.Fatalf("Prometheus query %q: got %v (%v) within 60 s\nprometheus: %s\nvasengine: %s", c.q, v, ok, promErr.String(), runErr.String())
			}
			select {
			case <-scrapes.C:
			case <-ctx.Done():
			}
		}
	}
	if err := run.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- run.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("vasengine after SIGINT: %v\n%s", err, runErr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("vasengine did not drain and exit within 30 s of SIGINT")
	}
	if !strings.Contains(runOut.String(), "= processed") {
		t.Fatalf("no summary after SIGINT:\n%s", runOut.String())
	}
}

// replayJSON replays args (-json added) and decodes the summary.
func replayJSON(t *testing.T, args ...string) (int, *summary, string) {
	t.Helper()
	code, out, stderr := runMain(append([]string{"replay", "-json"}, args...)...)
	var sum summary
	if out != "" {
		dec := json.NewDecoder(strings.NewReader(out))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&sum); err != nil {
			t.Fatalf("replay %v: the summary is not JSON of the schema: %v\n%s", args, err, out)
		}
	}
	return code, &sum, stderr
}

// stat reads a number of the JSON summary's backend_stats.
func stat(t *testing.T, sum *summary, key string) int64 {
	t.Helper()
	m, ok := sum.BackendStats.(map[string]any)
	if !ok {
		t.Fatalf("backend_stats %T: %v", sum.BackendStats, sum.BackendStats)
	}
	v, ok := m[key].(float64)
	if !ok {
		t.Fatalf("backend_stats has no number %q: %v", key, m)
	}
	return int64(v)
}

// TestRecordReplay: record a short simulator run, replay it at maximum
// speed; the replay's summary accounts for every record of the trace and
// for every event the engine was given; a truncated trace fails with its
// offset unless -salvage is given.
func TestRecordReplay(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run.vtr")
	code, out, stderr := runMain("record", "-o", path, "-events", "8000", "-duration", "2m", "-vms", "2", "-rate", "5000")
	if code != 0 {
		t.Fatalf("record: exit %d: %s", code, stderr)
	}
	var recorded uint64
	fmt.Sscanf(out[strings.Index(out, "submitted "):], "submitted %d", &recorded)
	code, sum, stderr := replayJSON(t, path)
	if code != 0 {
		t.Fatalf("replay: exit %d: %s", code, stderr)
	}
	checkReplayAccounting(t, sum)
	if replayed := stat(t, sum, "events_submitted"); recorded == 0 || uint64(replayed) != recorded {
		t.Fatalf("recorded %d events, the replay submitted %d", recorded, replayed)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cut := filepath.Join(t.TempDir(), "cut.vtr")
	if err := os.WriteFile(cut, raw[:len(raw)*2/3], 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, stderr = runMain("replay", cut)
	if code != 1 || !strings.Contains(stderr, "offset") {
		t.Fatalf("truncated replay: exit %d, stderr %q", code, stderr)
	}
	code, sum, stderr = replayJSON(t, "-salvage", cut)
	if code != 0 {
		t.Fatalf("salvage: exit %d: %s", code, stderr)
	}
	salvaged := stat(t, sum, "events_submitted")
	if m := sum.BackendStats.(map[string]any); salvaged == 0 || uint64(salvaged) >= recorded || m["damage"] == nil || m["complete"] != false {
		t.Fatalf("salvage: %d of %d events, backend stats %v", salvaged, recorded, m)
	}
	if code, _, _ := runMain("replay", filepath.Join(t.TempDir(), "none")); code != 2 {
		t.Fatalf("replay of a missing file: exit %d", code)
	}
}

// checkReplayAccounting: every record of the trace is accounted for, and
// the engine was given exactly the trace's events plus the synthetic ones.
func checkReplayAccounting(t *testing.T, sum *summary) {
	t.Helper()
	records, read, applied, skipped, unknown := stat(t, sum, "trace_records"), stat(t, sum, "records_read"),
		stat(t, sum, "applied"), stat(t, sum, "skipped"), stat(t, sum, "unknown_kinds")
	if records == 0 || records != read+unknown || read != applied+skipped {
		t.Errorf("records: the trace holds %d, read %d (+%d unknown), applied %d + skipped %d", records, read, unknown, applied, skipped)
	}
	var byKind int64
	for _, v := range sum.BackendStats.(map[string]any)["read_by_kind"].(map[string]any) {
		byKind += int64(v.(float64))
	}
	if byKind != read {
		t.Errorf("records read by kind sum to %d, read %d", byKind, read)
	}
	events, synthetic, retried := stat(t, sum, "events_submitted"), stat(t, sum, "synthetic_events"), stat(t, sum, "retried")
	if uint64(events+synthetic+retried) != sum.Events.Submitted {
		t.Errorf("the engine was given %d events; the replay submitted %d of the trace + %d synthetic + %d retried",
			sum.Events.Submitted, events, synthetic, retried)
	}
	if sum.Events.Submitted != sum.Events.Processed+sum.Events.Rejected {
		t.Errorf("engine: submitted %d != processed %d + rejected %d", sum.Events.Submitted, sum.Events.Processed, sum.Events.Rejected)
	}
}

// TestWorkersSummary: the summary says where the shard workers ran, in the
// JSON (one CPU per shard, -1 unpinned) and on the "workers:" line.
func TestWorkersSummary(t *testing.T) {
	allowed, err := shard.AllowedCPUs()
	if err != nil || len(allowed) == 0 {
		t.Skipf("no allowed CPU set: %v", err)
	}
	tr := writeTrace(t, trace.Record{Kind: trace.KindVMAdd, VM: 1, RAM: 1 << 20})
	for _, pin := range []bool{false, true} {
		args := []string{"-shards", "1"}
		want := -1
		if pin {
			args = append(args, "-cpus", strconv.Itoa(allowed[0]))
			want = allowed[0]
		}
		code, sum, stderr := replayJSON(t, append(args, tr)...)
		if code != 0 || !slices.Equal(sum.Workers.CPUs, []int{want}) {
			t.Fatalf("%v: exit %d, workers %+v, want CPUs [%d]: %s", args, code, sum.Workers, want, stderr)
		}
		code, out, _ := runMain(append([]string{"replay"}, append(args, tr)...)...)
		if line := "\nworkers: " + pinStr([]int{want}); code != 0 || !strings.Contains(out, line) {
			t.Fatalf("%v: exit %d, no %q line:\n%s", args, code, line, out)
		}
	}
}
