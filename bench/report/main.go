// Command report runs the benchmark suites (or reads their saved output),
// and writes a Markdown report with the figures, the machine, the commit and
// SVG plots (latency percentiles against load with the budget line;
// throughput against shards with the baselines), then refreshes the
// README's performance section from it. `make bench-report` runs it.
//
// The raw `go test -bench` output is kept beside the report (bench.txt), so
// benchstat can compare it with another commit's.
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

func main() {
	out := flag.String("out", "bench/results", "folder for REPORT.md, bench.txt and the plots")
	input := flag.String("input", "", "read this saved `go test -bench` output instead of running the suites")
	readme := flag.String("readme", "README.md", "README whose performance section is refreshed (empty: none)")
	benchtime := flag.String("benchtime", "1s", "go test -benchtime for the suites")
	flag.Parse()
	if err := run(*out, *input, *readme, *benchtime); err != nil {
		fmt.Fprintf(os.Stderr, "report: %v\n", err)
		os.Exit(1)
	}
}

// Command is what the report says produced it.
const command = "make bench-report"

var suites = []struct{ pkg, pattern string }{
	{"./bench/", "."},
	{"./engine/", "BenchmarkEngine|BenchmarkNaiveEngine|BenchmarkMemoryLimit"},
	{"./vasmon/", "BenchmarkLeafWrite|BenchmarkStartMonitor"},
}

func run(out, input, readme, benchtime string) error {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	var raw []byte
	if input != "" {
		var err error
		if raw, err = os.ReadFile(input); err != nil {
			return err
		}
	} else {
		var buf bytes.Buffer
		for _, s := range suites {
			cmd := exec.Command("go", "test", "-run", "^$", "-bench", s.pattern, "-benchmem", "-benchtime", benchtime, "-count", "1", s.pkg)
			cmd.Stdout = io.MultiWriter(&buf, os.Stdout)
			cmd.Stderr = os.Stderr
			if err := cmd.Run(); err != nil {
				return fmt.Errorf("%s: %w", strings.Join(cmd.Args, " "), err)
			}
		}
		raw = buf.Bytes()
	}
	if err := os.WriteFile(filepath.Join(out, "bench.txt"), raw, 0o644); err != nil {
		return err
	}
	rs := parse(raw)
	if len(rs) == 0 {
		return fmt.Errorf("no benchmark results in the output")
	}
	if err := plotLatency(rs, filepath.Join(out, "latency.svg")); err != nil {
		return err
	}
	if err := plotThroughput(rs, filepath.Join(out, "throughput.svg")); err != nil {
		return err
	}
	md := report(rs)
	if err := os.WriteFile(filepath.Join(out, "REPORT.md"), []byte(md), 0o644); err != nil {
		return err
	}
	if readme != "" {
		return refreshReadme(readme, summary(rs, out))
	}
	return nil
}

// result is one benchmark line: its name (without the -N suffix) and its
// metrics by unit.
type result struct {
	name string
	m    map[string]float64
}

var lineRE = regexp.MustCompile(`^(Benchmark\S+?)(-\d+)?\s+(\d+)\s+(.*)$`)

func parse(raw []byte) map[string]result {
	rs := map[string]result{}
	sc := bufio.NewScanner(bytes.NewReader(raw))
	for sc.Scan() {
		m := lineRE.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		r := result{name: m[1], m: map[string]float64{}}
		f := strings.Fields(m[4])
		for i := 0; i+1 < len(f); i += 2 {
			if v, err := strconv.ParseFloat(f[i], 64); err == nil {
				r.m[f[i+1]] = v
			}
		}
		rs[r.name] = r
	}
	return rs
}

func get(rs map[string]result, name, unit string) (float64, bool) {
	r, ok := rs[name]
	if !ok {
		return 0, false
	}
	v, ok := r.m[unit]
	return v, ok
}

func names(rs map[string]result, prefix string) []string {
	var ns []string
	for n := range rs {
		if strings.HasPrefix(n, prefix) {
			ns = append(ns, n)
		}
	}
	sort.Slice(ns, func(i, j int) bool { return natLess(ns[i], ns[j]) })
	return ns
}

// natLess orders names with numbers by value ("load=9%" before "load=10%").
func natLess(a, b string) bool {
	re := regexp.MustCompile(`\d+|\D+`)
	pa, pb := re.FindAllString(a, -1), re.FindAllString(b, -1)
	for i := 0; i < len(pa) && i < len(pb); i++ {
		if pa[i] == pb[i] {
			continue
		}
		na, ea := strconv.Atoi(pa[i])
		nb, eb := strconv.Atoi(pb[i])
		if ea == nil && eb == nil {
			return na < nb
		}
		return pa[i] < pb[i]
	}
	return len(pa) < len(pb)
}

func machine() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				model = strings.TrimSpace(strings.SplitN(l, ":", 2)[1])
				break
			}
		}
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0])
		if len(f) >= 2 {
			if kb, err := strconv.ParseFloat(f[1], 64); err == nil {
				mem = fmt.Sprintf(", %.0f GiB", kb/(1<<20))
			}
		}
	}
	return fmt.Sprintf("%d CPUs (%s)%s, %s %s/%s", runtime.NumCPU(), model, mem, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

func commit() string {
	out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	c := strings.TrimSpace(string(out))
	if st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(bytes.TrimSpace(st)) > 0 {
		c += " (with uncommitted changes)"
	}
	return c
}

func si(v float64) string {
	switch {
	case v >= 1e9:
		return fmt.Sprintf("%.2f G", v/1e9)
	case v >= 1e6:
		return fmt.Sprintf("%.2f M", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%.1f k", v/1e3)
	}
	return fmt.Sprintf("%.0f", v)
}

func us(ns float64) string { return fmt.Sprintf("%.1f us", ns/1e3) }

// best returns the highest events/s among the 2-shard throughput runs.
func best(rs map[string]result, shards int) float64 {
	b := 0.0
	for _, n := range names(rs, fmt.Sprintf("BenchmarkThroughput/shards=%d/", shards)) {
		if v, ok := get(rs, n, "events/s"); ok && v > b {
			b = v
		}
	}
	return b
}

func report(rs map[string]result) string {
	var w strings.Builder
	fmt.Fprintf(&w, "# vasengine benchmark report\n\nGenerated by `%s` on %s.\n\n", command, time.Now().UTC().Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(&w, "- machine: %s\n- commit: %s\n- raw output (benchstat input): [bench.txt](bench.txt)\n\n", machine(), commit())
	fmt.Fprintf(&w, "The workload (package bench): 4 VMs, 4-level paging, 128 leaf tables each, every leaf entry flipped and\nflipped back (half RW: a callback; half A: irrelevant), producers on one goroutine per VM. The machine's\nCPUs run the producers as well as the shard workers.\n\n")
	fmt.Fprintf(&w, "## Throughput\n\n![throughput](throughput.svg)\n\n| shards | batch | events/s | allocs/op |\n|---|---|---|---|\n")
	for _, n := range names(rs, "BenchmarkThroughput/") {
		var sh, ba int
		fmt.Sscanf(strings.TrimPrefix(n, "BenchmarkThroughput/"), "shards=%d/batch=%d", &sh, &ba)
		v, _ := get(rs, n, "events/s")
		a, _ := get(rs, n, "allocs/op")
		fmt.Fprintf(&w, "| %d | %d | %s | %.0f |\n", sh, ba, si(v), a)
	}
	b2 := best(rs, 2)
	fmt.Fprintf(&w, "\n### Baselines (same workload, same run)\n\n| engine | events/s | 2-shard engine / this |\n|---|---|---|\n")
	fmt.Fprintf(&w, "| vasengine, 2 shards (best batch) | %s | 1.00 |\n", si(b2))
	for _, b := range []struct{ name, label string }{
		{"BenchmarkBaseline/naive", "naive: mutex-protected map + a channel send per event"},
		{"BenchmarkBaseline/hvmi-locked", "HVMI-style: single-threaded vasmon.Monitor under one global lock"},
		{"BenchmarkBaseline/memory-floor", "memory floor: one random read-modify-write per event"},
	} {
		if v, ok := get(rs, b.name, "events/s"); ok {
			fmt.Fprintf(&w, "| %s | %s | %.2f |\n", b.label, si(v), b2/v)
		}
	}
	fmt.Fprintf(&w, "\n## Latency under open-loop load (budget 20 us; workers poll 1 ms before parking)\n\n![latency](latency.svg)\n\n")
	if m, ok := rs["BenchmarkJitterFloor"]; ok {
		fmt.Fprintf(&w, "Machine floor (BenchmarkJitterFloor, same run): a spinning thread loses %.1f%% of its time in gaps over 1 us; "+
			"an event arriving at a random moment waits p99 %s, p99.9 %s before any engine can see it.\n\n",
			m.m["stolen-%"], us(m.m["p99-floor-ns"]), us(m.m["p999-floor-ns"]))
	}
	fmt.Fprintf(&w, "| shards | load | offered events/s | p50 | p99 | p99.9 | over budget | pacer lag p99 | late batches |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, n := range names(rs, "BenchmarkLatency/") {
		m := rs[n].m
		shards, load := latencyName(n)
		fmt.Fprintf(&w, "| %d | %.0f%% | %s | %s | %s | %s | %.2f%% | %s | %.1f%% |\n", shards, load,
			si(m["offered-events/s"]), us(m["p50-ns"]), us(m["p99-ns"]), us(m["p999-ns"]), m["over-budget-%"],
			us(m["pacer-lag-p99-ns"]), m["late-batches-%"])
	}
	fmt.Fprintf(&w, "\n## Hooking and memory\n\n| benchmark | tables/s | bytes/table |\n|---|---|---|\n")
	for _, n := range names(rs, "BenchmarkStartMonitor") {
		m := rs[n].m
		fmt.Fprintf(&w, "| %s | %s | %.0f |\n", strings.TrimPrefix(n, "Benchmark"), si(m["tables/s"]), m["bytes/table"])
	}
	if ns := names(rs, "BenchmarkLeafWrite"); len(ns) > 0 {
		fmt.Fprintf(&w, "\n## Single-threaded monitor: one monitored leaf write\n\n| mode | ns/op | allocs/op |\n|---|---|---|\n")
		for _, n := range ns {
			m := rs[n].m
			fmt.Fprintf(&w, "| %s | %.1f | %.0f |\n", strings.TrimPrefix(n, "BenchmarkLeafWrite/"), m["ns/op"], m["allocs/op"])
		}
	}
	if ns := append(names(rs, "BenchmarkEngine/"), append(names(rs, "BenchmarkNaiveEngine"), names(rs, "BenchmarkMemoryLimit")...)...); len(ns) > 0 {
		fmt.Fprintf(&w, "\n## Engine package benchmarks\n\n| benchmark | events/s | p99 (saturated) | allocs/op |\n|---|---|---|---|\n")
		for _, n := range ns {
			m := rs[n].m
			p99 := "-"
			if v, ok := m["p99-ns"]; ok {
				p99 = us(v)
			}
			fmt.Fprintf(&w, "| %s | %s | %s | %.0f |\n", strings.TrimPrefix(n, "Benchmark"), si(m["events/s"]), p99, m["allocs/op"])
		}
	}
	return w.String()
}

// summary is the README's performance section.
func summary(rs map[string]result, out string) string {
	var w strings.Builder
	fmt.Fprintf(&w, "Measured by `%s` (full report: [%s](%s)), on %s, commit %s.\n\n", command,
		filepath.Join(out, "REPORT.md"), filepath.Join(out, "REPORT.md"), machine(), commit())
	b2, b1 := best(rs, 2), best(rs, 1)
	fmt.Fprintf(&w, "| figure | value |\n|---|---|\n")
	fmt.Fprintf(&w, "| throughput, 1 shard / 2 shards (best batch) | %s / %s events/s |\n", si(b1), si(b2))
	for _, b := range []struct{ name, label string }{
		{"BenchmarkBaseline/naive", "naive engine"},
		{"BenchmarkBaseline/hvmi-locked", "HVMI-style monitor under a global lock"},
		{"BenchmarkBaseline/memory-floor", "memory floor"},
	} {
		if v, ok := get(rs, b.name, "events/s"); ok {
			fmt.Fprintf(&w, "| %s | %s events/s (2-shard engine = %.2fx) |\n", b.label, si(v), b2/v)
		}
	}
	for _, shards := range []int{1, 2} {
		if v, ok := get(rs, fmt.Sprintf("BenchmarkLatency/shards=%d/load=50%%", shards), "p99-ns"); ok {
			fmt.Fprintf(&w, "| p99 trap-to-callback at 50%% of the maximum rate, %d shard(s) | %s (budget 20 us) |\n", shards, us(v))
		}
	}
	if v, ok := get(rs, "BenchmarkJitterFloor", "p99-floor-ns"); ok {
		fmt.Fprintf(&w, "| p99 latency floor of the machine (a spinning thread's gaps) | %s |\n", us(v))
	}
	if v, ok := get(rs, "BenchmarkStartMonitor/engine", "bytes/table"); ok {
		fmt.Fprintf(&w, "| host bytes per hooked table | %.0f |\n", v)
	}
	if v, ok := get(rs, "BenchmarkStartMonitor/engine", "tables/s"); ok {
		fmt.Fprintf(&w, "| start monitor (4,100 tables, 2 shards) | %s tables/s |\n", si(v))
	}
	fmt.Fprintf(&w, "\n![throughput](%s) ![latency](%s)\n", filepath.Join(out, "throughput.svg"), filepath.Join(out, "latency.svg"))
	return w.String()
}

const beginMark, endMark = "<!-- bench:begin -->", "<!-- bench:end -->"

func refreshReadme(path, section string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	s := string(b)
	i, j := strings.Index(s, beginMark), strings.Index(s, endMark)
	if i < 0 || j < i {
		return fmt.Errorf("%s has no %s ... %s section", path, beginMark, endMark)
	}
	s = s[:i+len(beginMark)] + "\n" + section + s[j:]
	return os.WriteFile(path, []byte(s), 0o644)
}

func plotLatency(rs map[string]result, path string) error {
	ns := names(rs, "BenchmarkLatency/")
	if len(ns) == 0 {
		return nil
	}
	p := plot.New()
	p.Title.Text = "Trap-to-callback latency against load (open loop)"
	p.X.Label.Text = "offered load (% of the configuration's measured maximum)"
	p.Y.Label.Text = "latency (us, log scale)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	var lines []any
	for _, shards := range []int{1, 2} {
		for _, q := range []struct{ unit, label string }{{"p50-ns", "p50"}, {"p99-ns", "p99"}, {"p999-ns", "p99.9"}} {
			var xy plotter.XYs
			for _, n := range ns {
				if sh, pct := latencyName(n); sh == shards {
					xy = append(xy, plotter.XY{X: pct, Y: max(rs[n].m[q.unit]/1e3, 0.01)})
				}
			}
			if len(xy) > 0 {
				lines = append(lines, fmt.Sprintf("%s, %d shard(s)", q.label, shards), xy)
			}
		}
	}
	if err := plotutil.AddLinePoints(p, lines...); err != nil {
		return err
	}
	budget := plotter.NewFunction(func(float64) float64 { return 20 })
	budget.Dashes = []vg.Length{vg.Points(4), vg.Points(4)}
	p.Add(budget)
	p.Legend.Add("budget 20 us", budget)
	if v, ok := get(rs, "BenchmarkJitterFloor", "p99-floor-ns"); ok {
		floor := plotter.NewFunction(func(float64) float64 { return max(v/1e3, 0.01) })
		floor.Dashes = []vg.Length{vg.Points(1), vg.Points(3)}
		p.Add(floor)
		p.Legend.Add("machine p99 floor", floor)
	}
	p.Y.Min = min(p.Y.Min, 1) // keep the budget line in view
	p.Y.Max *= 1000           // room for the legend above the lines
	p.Legend.Top = true
	p.Legend.Left = true
	return p.Save(7*vg.Inch, 5*vg.Inch, path)
}

func plotThroughput(rs map[string]result, path string) error {
	ns := names(rs, "BenchmarkThroughput/")
	if len(ns) == 0 {
		return nil
	}
	p := plot.New()
	p.Title.Text = "Throughput against shards (closed loop)"
	p.X.Label.Text = "shards"
	p.Y.Label.Text = "million events/s"
	byBatch := map[int]plotter.XYs{}
	for _, n := range ns {
		var sh, ba int
		fmt.Sscanf(strings.TrimPrefix(n, "BenchmarkThroughput/"), "shards=%d/batch=%d", &sh, &ba)
		byBatch[ba] = append(byBatch[ba], plotter.XY{X: float64(sh), Y: rs[n].m["events/s"] / 1e6})
	}
	var batches []int
	for b := range byBatch {
		batches = append(batches, b)
	}
	sort.Ints(batches)
	var lines []any
	for _, b := range batches {
		lines = append(lines, fmt.Sprintf("batch %d", b), byBatch[b])
	}
	if err := plotutil.AddLinePoints(p, lines...); err != nil {
		return err
	}
	for i, b := range []struct{ name, label string }{
		{"BenchmarkBaseline/naive", "naive engine"},
		{"BenchmarkBaseline/hvmi-locked", "HVMI-style, global lock"},
	} {
		if v, ok := get(rs, b.name, "events/s"); ok {
			f := plotter.NewFunction(func(float64) float64 { return v / 1e6 })
			f.Dashes = []vg.Length{vg.Points(2 + 2*float64(i)), vg.Points(3)}
			p.Add(f)
			p.Legend.Add(b.label, f)
		}
	}
	p.Y.Min = 0
	p.Y.Max *= 1.4 // room for the legend
	p.Legend.Top = true
	return p.Save(7*vg.Inch, 4*vg.Inch, path)
}

// latencyName parses "BenchmarkLatency/shards=N/load=P%".
func latencyName(n string) (shards int, load float64) {
	fmt.Sscanf(strings.TrimPrefix(n, "BenchmarkLatency/"), "shards=%d/load=%f", &shards, &load)
	return shards, load
}
