package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func runMain(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := Main(args, &out, &errb)
	return code, out.String(), errb.String()
}

// TestUsageErrors: bad flags and impossible configurations end with one
// line on stderr and exit status 2, never a panic.
func TestUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{"bogus"},
		{"run", "-shards", "0"},
		{"run", "-shards", "-3"},
		{"run", "-budget", "0"},
		{"run", "-budget", "-1s"},
		{"run", "-cpus", "4095"},
		{"run", "-cpus", "3-1"},
		{"run", "-cpus", "x"},
		{"run", "-profile", "nope"},
		{"run", "-backend", "nope"},
		{"run", "-duration", "0s"},
		{"run", "-vms", "0"},
		{"run", "-vcpus", "0"},
		{"run", "-queue-depth", "1"},
		{"run", "-batch", "0"},
		{"run", "-spin", "-1s"},
		{"run", "-mode", "7-level"},
		{"run", "-rate", "-5"},
		{"run", "-burst", "soon"},
		{"run", "-nosuchflag"},
		{"run", "extra-argument"},
		{"run", "-listen", "256.1.1.1:99999"},
		{"record"},
	} {
		code, _, stderr := runMain(args...)
		if code != 2 {
			t.Errorf("%v: exit %d, want 2 (stderr %q)", args, code, stderr)
			continue
		}
		lines := strings.Split(strings.TrimSpace(stderr), "\n")
		last := lines[len(lines)-1]
		if !strings.HasPrefix(last, "vasengine: ") {
			t.Errorf("%v: last stderr line %q does not say what is wrong", args, last)
		}
	}
}

// TestRunSim: the default job on the simulator prints the summary and
// accounts for every event.
func TestRunSim(t *testing.T) {
	code, out, stderr := runMain("run", "-duration", "1500ms", "-vms", "3", "-rate", "5000")
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
	for _, c := range checks {
		for {
			if v, ok := query(c.q); ok && c.ok(v) {
				break
			}
			if ctx.Err() != nil {
				v, ok := query(c.q)
				t.Fatalf("Prometheus query %q: got %v (%v) within 60 s\nprometheus: %s\nvasengine: %s", c.q, v, ok, promErr.String(), runErr.String())
			}
			time.Sleep(500 * time.Millisecond)
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

// TestRecordReplay: record a short simulator run, replay it at maximum
// speed, and check that a truncated trace fails with its offset unless
// -salvage is given.
func TestRecordReplay(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run.vtr")
	code, out, stderr := runMain("record", "-o", path, "-duration", "1s", "-vms", "2", "-rate", "5000")
	if code != 0 {
		t.Fatalf("record: exit %d: %s", code, stderr)
	}
	var recorded uint64
	fmt.Sscanf(out[strings.Index(out, "submitted "):], "submitted %d", &recorded)
	code, out, stderr = runMain("replay", path)
	if code != 0 {
		t.Fatalf("replay: exit %d: %s", code, stderr)
	}
	// The replay submits the trace's events, plus synthetic writes for
	// pages it hooked before their Page record (see backends/replay).
	var records, replayed uint64
	fmt.Sscanf(stderr[strings.Index(stderr, "replay: "):], "replay: %d records, %d events", &records, &replayed)
	if recorded == 0 || replayed != recorded {
		t.Fatalf("recorded %d events, the replay read %d\n%s", recorded, replayed, stderr)
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
	code, _, stderr = runMain("replay", "-salvage", cut)
	var salvaged uint64
	if i := strings.Index(stderr, "replay: "); i >= 0 {
		fmt.Sscanf(stderr[i:], "replay: %d records, %d events", &records, &salvaged)
	}
	if salvaged == 0 || salvaged >= recorded || !strings.Contains(stderr, "damage") {
		t.Fatalf("salvage: exit %d, %d of %d events, stderr %q", code, salvaged, recorded, stderr)
	}
	if code, _, _ := runMain("replay"); code != 2 {
		t.Fatalf("replay without a file: exit %d", code)
	}
	if code, _, _ := runMain("replay", filepath.Join(t.TempDir(), "none")); code != 2 {
		t.Fatalf("replay of a missing file: exit %d", code)
	}
}
