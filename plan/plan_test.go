package plan

import (
	"bytes"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vasengine/vasengine/trace"
)

const us = time.Microsecond

func pt(rate float64, p99 time.Duration) Point {
	return Point{Offered: rate, Achieved: rate, P50: p99 / 4, P99: p99, P999: 2 * p99}
}

func TestRateWithin(t *testing.T) {
	for _, c := range []struct {
		name    string
		pts     []Point
		want    float64
		bounded bool
	}{
		{"interpolated between the last within and the first over", []Point{pt(100, 5*us), pt(200, 10*us), pt(300, 30*us)}, 250, true},
		{"exactly at the budget", []Point{pt(100, 5*us), pt(200, 20*us), pt(300, 30*us)}, 200, true},
		{"order of the points does not matter", []Point{pt(300, 30*us), pt(100, 5*us), pt(200, 10*us)}, 250, true},
		{"never over: a lower bound", []Point{pt(100, 5*us), pt(200, 6*us)}, 200, false},
		{"over from the start", []Point{pt(100, 25*us), pt(200, 30*us)}, 0, true},
		{"the first crossing counts, not a later dip", []Point{pt(100, 10*us), pt(200, 30*us), pt(300, 10*us)}, 150, true},
		{"a saturated point is over whatever its p99", []Point{pt(100, 10*us), {Offered: 400, Achieved: 200, P99: us, Saturated: true}}, 100, true},
		{"achieved rate preferred to offered", []Point{{Offered: 1000, Achieved: 100, P99: us}}, 100, false},
		{"offered when achieved is unknown", []Point{{Offered: 1000, P99: us}}, 1000, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			cv := Curve{Points: c.pts}
			got, bounded := cv.RateWithin(20 * us)
			if dip := strings.Contains(c.name, "dip"); cv.disturbed(20*us) != dip {
				t.Errorf("disturbed = %v, want %v", !dip, dip)
			}
			if math.Abs(got-c.want) > 1e-9 || bounded != c.bounded {
				t.Fatalf("RateWithin = %v, %v; want %v, %v", got, bounded, c.want, c.bounded)
			}
		})
	}
}

func TestP99At(t *testing.T) {
	cv := Curve{Points: []Point{pt(100, 10*us), pt(300, 30*us)}}
	for _, c := range []struct {
		rate float64
		want time.Duration
	}{{50, 10 * us}, {100, 10 * us}, {200, 20 * us}, {300, 30 * us}, {900, 30 * us}} {
		if got := cv.P99At(c.rate); got != c.want {
			t.Errorf("P99At(%v) = %v, want %v", c.rate, got, c.want)
		}
	}
}

// base: the curve sustains 1M events/s within 20 us (crossing interpolated
// at 1M), 2 shards x 16384 queued events, 8 GiB for tables at 4 KiB each.
func base() Inputs {
	return Inputs{
		Curve:    Curve{Points: []Point{pt(500e3, 10*us), pt(1e6, 20*us), pt(1.5e6, 100*us)}},
		Workload: Workload{RatePerVM: 10e3, TablesPerVM: 100, BurstPerVM: 100, VCPUsPerVM: 2},
		Budget:   20 * us, Headroom: 0.2, Shards: 2, QueueDepth: 16384,
		MemBytes: 8 << 30, BytesPerTable: 4096, MaxVMs: 1024,
	}
}

func TestCompute(t *testing.T) {
	for _, c := range []struct {
		name    string
		change  func(*Inputs)
		binding string
		vms     int
		limits  map[string]int
	}{
		// cpu 1e6*0.8/10e3 = 80; queues 32768*0.8/100 = 262; memory
		// 8Gi*0.8/(100*4096) = 16777; slots 1024.
		{"cpu binds", func(*Inputs) {}, CPU, 80, map[string]int{CPU: 80, Queues: 262, Memory: 16777, VMSlots: 1024}},
		{"no headroom", func(in *Inputs) { in.Headroom = 0 }, CPU, 100, map[string]int{CPU: 100, Queues: 327, Memory: 20971}},
		{"bursty VMs: queues bind", func(in *Inputs) { in.Workload.BurstPerVM = 2000 }, Queues, 13, nil},
		{"big address spaces: memory binds", func(in *Inputs) { in.Workload.TablesPerVM = 1e6 }, Memory, 1, nil},
		{"quiet VMs: the engine's slots bind", func(in *Inputs) { in.Workload.RatePerVM, in.Workload.BurstPerVM = 10, 1 }, VMSlots, 1024, nil},
		{"nothing within the budget: no VM", func(in *Inputs) { in.Budget = 5 * us }, CPU, 0, nil},
		{"a tie binds the first constraint", func(in *Inputs) { in.Workload.BurstPerVM = 32768 * 0.8 / 80 }, CPU, 80, map[string]int{Queues: 80}},
		{"an idle workload: cpu unbounded", func(in *Inputs) { in.Workload.RatePerVM = 0 }, Queues, 262, map[string]int{CPU: Unbounded}},
		{"no slot limit, nothing used: unbounded", func(in *Inputs) {
			in.MaxVMs, in.Workload = 0, Workload{}
		}, CPU, Unbounded, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			in := base()
			c.change(&in)
			p, err := Compute(in)
			if err != nil {
				t.Fatal(err)
			}
			if got := p.Constraints[p.Binding].Name; got != c.binding || p.VMs != c.vms {
				t.Fatalf("binding %s with %d VMs, want %s with %d (constraints %+v)", got, p.VMs, c.binding, c.vms, p.Constraints)
			}
			for _, k := range p.Constraints {
				if want, ok := c.limits[k.Name]; ok && k.VMs != want {
					t.Errorf("%s admits %d VMs, want %d", k.Name, k.VMs, want)
				}
			}
			if p.VMs != Unbounded && p.VCPUs != p.VMs*max(in.Workload.VCPUsPerVM, 1) {
				t.Errorf("%d vCPUs for %d VMs", p.VCPUs, p.VMs)
			}
			if p.VMs > 0 && p.VMs != Unbounded && p.LoadP99 > p.Budget {
				t.Errorf("the operating point's p99 %v exceeds the budget %v", p.LoadP99, p.Budget)
			}
		})
	}
}

func TestComputeErrors(t *testing.T) {
	for _, c := range []struct {
		name   string
		change func(*Inputs)
	}{
		{"zero budget", func(in *Inputs) { in.Budget = 0 }},
		{"negative budget", func(in *Inputs) { in.Budget = -us }},
		{"headroom 1", func(in *Inputs) { in.Headroom = 1 }},
		{"negative headroom", func(in *Inputs) { in.Headroom = -0.1 }},
		{"NaN headroom", func(in *Inputs) { in.Headroom = math.NaN() }},
		{"no points", func(in *Inputs) { in.Curve.Points = nil }},
		{"no shards", func(in *Inputs) { in.Shards = 0 }},
		{"negative rate", func(in *Inputs) { in.Workload.RatePerVM = -1 }},
		{"tables without bytes per table", func(in *Inputs) { in.BytesPerTable = 0 }},
	} {
		in := base()
		c.change(&in)
		if _, err := Compute(in); err == nil {
			t.Errorf("%s: no error", c.name)
		}
	}
}

const benchOut = `goos: linux
goarch: amd64
pkg: github.com/vasengine/vasengine/bench
BenchmarkThroughput/shards=2/batch=256-2   	 1000000	      1000 ns/op	   1000000 events/s	       0 B/op	       0 allocs/op
BenchmarkLatency/load=10%-2         	  200000	      3828 ns/op	    261686 offered-events/s	        0.12 over-budget-%	      6881 p50-ns	     12020 p99-ns	     35480 p999-ns
BenchmarkLatency/load=50%-2         	  200000	       884.8 ns/op	   1308431 offered-events/s	        9.58 over-budget-%	     13538 p50-ns	     35651 p99-ns	     39845 p999-ns
BenchmarkLatency/load=10%-2         	  200000	      3828 ns/op	    261000 offered-events/s	        0.12 over-budget-%	      6000 p50-ns	     15000 p99-ns	     30000 p999-ns
BenchmarkLatency/broken-2           	  200000	      3828 ns/op
BenchmarkStartMonitor/engine-2      	      50	  20000000 ns/op	    200000 tables/s	      4313 bytes/table
PASS
`

func TestParseReport(t *testing.T) {
	pts, bpt, err := ParseReport(strings.NewReader(benchOut), 2)
	if err != nil {
		t.Fatal(err)
	}
	if bpt != 4313 {
		t.Errorf("bytes/table %v, want 4313", bpt)
	}
	want := []Point{
		{Label: "load=10%", Offered: 261000, P50: 6881, P99: 15000, P999: 35480}, // -count 2: the worst of each
		{Label: "load=50%", Offered: 1308431, P50: 13538, P99: 35651, P999: 39845},
	}
	if len(pts) != len(want) {
		t.Fatalf("%d points, want %d: %+v", len(pts), len(want), pts)
	}
	for i := range want {
		if pts[i] != want[i] {
			t.Errorf("point %d: %+v, want %+v", i, pts[i], want[i])
		}
	}
	for _, bad := range []string{"", "PASS\n", "BenchmarkThroughput/shards=2/batch=256-2 100 10 ns/op 5 events/s\n",
		"BenchmarkLatency/load=10%-2 100 10 ns/op 5 p99-ns\n"} {
		if _, _, err := ParseReport(strings.NewReader(bad), 2); err == nil {
			t.Errorf("ParseReport(%q): no error", bad)
		}
	}
}

// TestParseReportShards: of a report with latency lines per shard count,
// only the requested count's are read; a count it lacks is an error that
// names the counts it has.
func TestParseReportShards(t *testing.T) {
	const out = `BenchmarkLatency/shards=1/load=50%-2   100   10 ns/op   1000 offered-events/s   5 p50-ns   7 p99-ns   9 p999-ns
BenchmarkLatency/shards=2/load=50%-2   100   10 ns/op   2000 offered-events/s   6 p50-ns   8 p99-ns   9 p999-ns
BenchmarkLatency/shards=2/load=90%-2   100   10 ns/op   3000 offered-events/s   6 p50-ns   8 p99-ns   9 p999-ns
`
	pts, _, err := ParseReport(strings.NewReader(out), 2)
	if err != nil {
		t.Fatal(err)
	}
	if len(pts) != 2 || pts[0].Label != "load=50%" || pts[0].Offered != 2000 || pts[1].Offered != 3000 {
		t.Fatalf("2 shards: %+v", pts)
	}
	if pts, _, err = ParseReport(strings.NewReader(out), 1); err != nil || len(pts) != 1 || pts[0].Offered != 1000 {
		t.Fatalf("1 shard: %+v, %v", pts, err)
	}
	if _, _, err = ParseReport(strings.NewReader(out), 4); err == nil || !strings.Contains(err.Error(), "1, 2") {
		t.Fatalf("4 shards: %v", err)
	}
}

// promOut is a trimmed scrape of `vasengine run -vms 3 -listen ...`, with
// the engine's label limit at 2 VMs.
const promOut = `# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1.7e+09
# HELP vasengine_hooked_tables Page tables hooked.
# TYPE vasengine_hooked_tables gauge
vasengine_hooked_tables 300
# HELP vasengine_table_host_bytes Host memory held for hooked tables (shadows, nodes, indexes).
# TYPE vasengine_table_host_bytes gauge
vasengine_table_host_bytes 1.5e+06
# HELP vasengine_vm_events_submitted_total Events submitted per VM.
# TYPE vasengine_vm_events_submitted_total counter
vasengine_vm_events_submitted_total{vm="1"} 100000
vasengine_vm_events_submitted_total{vm="2"} 300000
vasengine_vm_events_submitted_total{vm="other"} 200000
# HELP vasengine_vms VMs registered.
# TYPE vasengine_vms gauge
vasengine_vms 4
`

func TestParseProm(t *testing.T) {
	at := time.Unix(1.7e9+100, 0)
	s, err := ParseProm(strings.NewReader(promOut), at)
	if err != nil {
		t.Fatal(err)
	}
	w, bpt := s.Workload()
	// 600k events in 100 s over 4 VMs (two of them as vm="other").
	if w.VMs != 4 || w.RatePerVM != 1500 || w.PeakRate != 3000 || w.TablesPerVM != 75 || bpt != 5000 {
		t.Fatalf("workload %+v, bytes/table %v", w, bpt)
	}
	// A /federate output carries its own scrape time.
	fed := strings.ReplaceAll(promOut, "vasengine_vms 4\n", "vasengine_vms 4 1700000050000\n")
	if s, err = ParseProm(strings.NewReader(fed), at); err != nil || !s.At.Equal(time.Unix(1.7e9+50, 0)) {
		t.Fatalf("federated: at %v, %v", s.At, err)
	}
	for name, bad := range map[string]string{
		"not an exposition": "{{{",
		"no start time":     strings.ReplaceAll(promOut, "process_start_time_seconds 1.7e+09", ""),
		"no vm series":      strings.ReplaceAll(promOut, "vasengine_vm_events_submitted_total{", "x{"),
		"not vasengine":     "process_start_time_seconds 1.7e+09\n",
	} {
		if _, err := ParseProm(strings.NewReader(bad), at); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if _, err := ParseProm(strings.NewReader(promOut), time.Unix(1.7e9-1, 0)); err == nil {
		t.Error("a scrape before the process start: no error")
	}
}

func TestBurstMeter(t *testing.T) {
	var b BurstMeter
	ms := int64(time.Millisecond)
	for _, t := range []int64{0, 10, 20, ms - 1, ms, ms + 5, 3 * ms, 3*ms + 1, 3 * ms} { // the last is out of order
		b.Add(t)
	}
	// (5ns, 1ms+5ns] holds 10, 20, 1ms-1, 1ms, 1ms+5: 5 events; (2ms, 3ms+1]
	// holds 3 (the late 3ms counted at 3ms+1).
	if b.Max != 5 {
		t.Fatalf("max %d, want 5", b.Max)
	}
}

func TestReadTrace(t *testing.T) {
	var buf bytes.Buffer
	w, err := trace.NewWriter(&buf, trace.Header{Start: time.Unix(1e9, 0)})
	if err != nil {
		t.Fatal(err)
	}
	write := func(r trace.Record) {
		if err := w.Write(&r); err != nil {
			t.Fatal(err)
		}
	}
	sec := int64(time.Second)
	write(trace.Record{Kind: trace.KindVMAdd, VM: 1, RAM: 1 << 30})
	for _, gpa := range []uint64{0x1000, 0x2000, 0x1000} { // a table page read twice counts once
		write(trace.Record{Kind: trace.KindPage, VM: 1, GPA: gpa, Page: make([]byte, trace.PageSize)})
	}
	for i := int64(0); i < 1000; i++ { // VM 1: 1000 events/s over 1 s
		write(trace.Record{Kind: trace.KindEvent, Time: i * sec / 1000, VM: 1, GPA: 0x1008, Size: 8, Data: 1})
	}
	write(trace.Record{Kind: trace.KindVMAdd, Time: sec / 2, VM: 2, RAM: 1 << 30})
	for i := int64(0); i < 100; i++ { // VM 2: 100 events in 100 us, over its 0.5 s
		write(trace.Record{Kind: trace.KindEvent, Time: sec/2 + i*1000, VM: 2, GPA: 0x1008, Size: 8, Data: 1})
	}
	write(trace.Record{Kind: trace.KindVMRemove, Time: sec, VM: 2})
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	r, err := trace.NewReader(&buf, trace.ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	wl, err := ReadTrace(r)
	if err != nil {
		t.Fatal(err)
	}
	// VM 1: 1000 events over the trace's 1 s (never removed); VM 2: 100
	// over its 0.5 s.
	rate1, rate2 := 1000.0, 200.0
	if wl.VMs != 2 || math.Abs(wl.RatePerVM-(rate1+rate2)/2) > 1e-6 || math.Abs(wl.PeakRate-rate1) > 1e-6 ||
		wl.TablesPerVM != 1 || wl.BurstPerVM != 100 {
		t.Fatalf("workload %+v", wl)
	}
	empty := new(bytes.Buffer)
	w, _ = trace.NewWriter(empty, trace.Header{})
	w.Close()
	r, _ = trace.NewReader(empty, trace.ReaderOptions{})
	if _, err := ReadTrace(r); err == nil {
		t.Error("an empty trace: no error")
	}
}

func TestWrite(t *testing.T) {
	in := base()
	in.Curve.Source = "test"
	in.Curve.Points = append(in.Curve.Points, Point{Label: "max", Achieved: 1.6e6, P99: time.Millisecond, Saturated: true})
	p, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	if err := p.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"rate within the budget (p99 <= 20µs): 1.00M events/s", "saturated", "<- binding",
		"plan: 80 VMs (160 vCPUs), bound by cpu"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
	path := filepath.Join(t.TempDir(), "plan.svg")
	if err := p.WritePlot(path); err != nil {
		t.Fatal(err)
	}
	svg, err := os.ReadFile(path)
	if err != nil || !bytes.Contains(svg, []byte("<svg")) || !bytes.Contains(svg, []byte("plan: 80 VMs")) {
		t.Fatalf("plot: %v, %d bytes", err, len(svg))
	}
}

// TestInversions: a curve whose p99 falls as the load rises (beyond the
// tolerance) is reported, pair by pair; a noisy but rising one is not.
func TestInversions(t *testing.T) {
	inverted := Curve{Points: []Point{pt(1e6, 21*time.Millisecond), pt(3e6, 9*time.Millisecond), pt(5e6, 5*time.Millisecond)}}
	if inv := inverted.Inversions(); len(inv) != 2 || inv[0].Lighter.P99 != 21*time.Millisecond || inv[1].Heavier.P99 != 5*time.Millisecond {
		t.Fatalf("inversions %+v", inv)
	}
	noisy := Curve{Points: []Point{pt(1e6, 442*us), pt(3e6, 1048*us), pt(5e6, 1769*us), pt(7e6, 1638*us)}}
	if inv := noisy.Inversions(); len(inv) != 0 {
		t.Fatalf("a rising curve with a 8%% dip: inversions %+v", inv)
	}
	in := base()
	in.Curve = inverted
	in.Budget = 30 * time.Millisecond
	p, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	if err := p.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "WARNING: the curve is not monotone") || !strings.Contains(b.String(), "p99 21.00ms at 1.00M events/s") {
		t.Fatalf("the table does not say the curve is inverted:\n%s", b.String())
	}
}

// TestAlternatives: when no VM fits the budget, the plan says which of the
// budgets the curve measured would fit how many.
func TestAlternatives(t *testing.T) {
	in := base()
	in.Budget = 5 * us
	p, err := Compute(in)
	if err != nil {
		t.Fatal(err)
	}
	// 10 us: 500k within -> 40 VMs; 20 us: 1M -> 80; 100 us: 1.5M (a lower
	// bound) -> 120.
	want := []Alternative{{10 * us, 40, CPU}, {20 * us, 80, CPU}, {100 * us, 120, CPU}}
	if p.VMs != 0 || len(p.Alternatives) != len(want) {
		t.Fatalf("%d VMs, alternatives %+v", p.VMs, p.Alternatives)
	}
	for i := range want {
		if p.Alternatives[i] != want[i] {
			t.Errorf("alternative %d: %+v, want %+v", i, p.Alternatives[i], want[i])
		}
	}
	var b strings.Builder
	p.WriteTable(&b)
	if !strings.Contains(b.String(), "no VM fits within the budget of 5µs") || !strings.Contains(b.String(), "a budget of 10.0µs would fit 40 VMs (bound by cpu)") {
		t.Fatalf("table:\n%s", b.String())
	}
	// Memory binds: no budget helps, and the plan says so.
	in.Workload.TablesPerVM = 1e12
	if p, _ = Compute(in); len(p.Alternatives) != 0 {
		t.Fatalf("memory-bound: alternatives %+v", p.Alternatives)
	}
}

// TestParsePromLatency: the snapshot's own latency histogram gives its p99
// and a point of the curve at its mean load.
func TestParsePromLatency(t *testing.T) {
	hist := promOut + `# HELP vasengine_callback_latency_seconds Trap-to-callback latency.
# TYPE vasengine_callback_latency_seconds histogram
vasengine_callback_latency_seconds_bucket{le="0.001"} 10
vasengine_callback_latency_seconds_bucket{le="0.01"} 50
vasengine_callback_latency_seconds_bucket{le="1"} 980
vasengine_callback_latency_seconds_bucket{le="+Inf"} 1000
vasengine_callback_latency_seconds_sum 900
vasengine_callback_latency_seconds_count 1000
`
	s, err := ParseProm(strings.NewReader(hist), time.Unix(1.7e9+100, 0))
	if err != nil {
		t.Fatal(err)
	}
	if s.Callbacks != 1000 || s.P99 != time.Second || !s.P99Beyond {
		t.Fatalf("callbacks %v, p99 %v beyond %v", s.Callbacks, s.P99, s.P99Beyond)
	}
	p, ok := s.Point()
	if !ok || p.Rate() != 6000 || p.P99 != time.Second {
		t.Fatalf("point %+v %v", p, ok)
	}
	within := strings.ReplaceAll(hist, `le="1"} 980`, `le="1"} 995`)
	if s, _ = ParseProm(strings.NewReader(within), time.Unix(1.7e9+100, 0)); s.P99 != time.Second || s.P99Beyond {
		t.Fatalf("p99 in the last finite bucket: %v beyond %v", s.P99, s.P99Beyond)
	}
	if s, _ = ParseProm(strings.NewReader(promOut), time.Unix(1.7e9+100, 0)); s.Callbacks != 0 {
		t.Fatal("no histogram: callbacks counted")
	}
	if _, ok := s.Point(); ok {
		t.Fatal("no histogram: a point")
	}
}
