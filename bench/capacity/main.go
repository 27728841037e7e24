// Command capacity checks vasengine's capacity plans against runs at
// their scale (issue 18) and writes bench/results/CAPACITY.md and
// capacity.svg: for each profile and shard count it runs `vasengine plan
// -verify` (the plan measures its cost curve at scale, then runs the
// planned configuration), then verifies the plan's predictions at other VM
// counts (half and 1.5 times the planned VMs, predicted by interpolating the
// plan's curve, memory by tables per VM x bytes per table) with `vasengine
// plan -verify -promise`. Every figure is printed by vasengine itself; this
// command only collects them.
//
//	go run ./bench/capacity [-budget 2ms] [-profiles web,build,linux] [-shards 1,2]
package main

import (
	"bytes"
	"flag"
	"fmt"
	"image/color"
	"math"
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
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgsvg"

	"github.com/vasengine/vasengine/plan"
)

func main() {
	out := flag.String("out", "bench/results", "folder for CAPACITY.md and capacity.svg")
	budget := flag.String("budget", "2ms", "the plans' p99 budget")
	profiles := flag.String("profiles", "web,build,linux", "simulator profiles")
	shards := flag.String("shards", "1,2", "shard counts")
	vdur := flag.String("verify-duration", "3s", "each verify run's length")
	flag.Parse()
	if err := run(*out, *budget, strings.Split(*profiles, ","), strings.Split(*shards, ","), *vdur); err != nil {
		fmt.Fprintf(os.Stderr, "capacity: %v\n", err)
		os.Exit(1)
	}
}

// row is one verify run: predicted and measured at n VMs.
type row struct {
	profile, shards        string
	n                      int
	planned                bool
	predP99, measP99       time.Duration
	predMem, measMem       float64
	predEvents, measEvents float64
	exit                   int
	load                   string
	promise                plan.Promise
	verifyCmd              string
}

var (
	curveRE   = regexp.MustCompile(`(?m)^ +(\d+) VMs +\S+ +\S+ +(\S+) +(\S+) +(\S+)`)
	verifyRE  = regexp.MustCompile(`(?m)^verify: vasengine (plan -verify .*)$`)
	p99RE     = regexp.MustCompile(`(?m)^ +p99 +(\S+) +(\S+)`)
	memRE     = regexp.MustCompile(`(?m)^ +table memory +(\S+ \S+) +(\S+ \S+) \(`)
	eventsRE  = regexp.MustCompile(`(?m)^ +events/s +(\S+) +(\S+)`)
	noFitRE   = regexp.MustCompile(`(?m)^plan: no VM fits.*$`)
	altRE     = regexp.MustCompile(`(?m)^  a budget of .*$`)
	planRE    = regexp.MustCompile(`(?m)^plan: \d+ VMs.*$`)
	tablesRE  = regexp.MustCompile(`per VM: \S+ events/s, (\d+) tables`)
	bptRE     = regexp.MustCompile(`at (\S+ \S+) per table`)
	loadavgRE = regexp.MustCompile(`^(\S+) (\S+) (\S+)`)
)

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	if m := loadavgRE.FindStringSubmatch(string(b)); m != nil {
		return m[1]
	}
	return "?"
}

func vasengine(bin string, args ...string) (string, int) {
	cmd := exec.Command(bin, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = os.Stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		code = -1
	}
	os.Stdout.Write(out.Bytes())
	return out.String(), code
}

func parseBytes(s string) float64 {
	f := strings.Fields(s)
	if len(f) != 2 {
		return math.NaN()
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return math.NaN()
	}
	return v * map[string]float64{"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[f[1]]
}

func parseSI(s string) float64 {
	mult := 1.0
	switch {
	case strings.HasSuffix(s, "k"):
		mult, s = 1e3, strings.TrimSuffix(s, "k")
	case strings.HasSuffix(s, "M"):
		mult, s = 1e6, strings.TrimSuffix(s, "M")
	}
	v, _ := strconv.ParseFloat(s, 64)
	return v * mult
}

func dur(s string) time.Duration {
	d, _ := time.ParseDuration(s)
	return d
}

// measured reads a verify table into r.
func measured(r *row, out string) {
	if m := p99RE.FindStringSubmatch(out); m != nil {
		r.measP99 = dur(m[2])
	}
	if m := memRE.FindStringSubmatch(out); m != nil {
		r.measMem = parseBytes(m[2])
	}
	if m := eventsRE.FindStringSubmatch(out); m != nil {
		r.measEvents = parseSI(m[2])
	}
}

func run(out, budget string, profiles, shards []string, vdur string) error {
	bin := filepath.Join(os.TempDir(), "vasengine-capacity")
	if b, err := exec.Command("go", "build", "-o", bin, "./cmd/vasengine").CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v: %s", err, b)
	}
	var rows []row
	var notes []string
	start := time.Now()
	for _, prof := range profiles {
		for _, sh := range shards {
			la := loadavg()
			fmt.Fprintf(os.Stderr, "capacity: plan -profile %s -shards %s -budget %s -verify (load average %s)\n", prof, sh, budget, la)
			txt, code := vasengine(bin, "plan", "-profile", prof, "-shards", sh, "-budget", budget, "-mem", "8GiB", "-verify", "-verify-duration", vdur)
			m := verifyRE.FindStringSubmatch(txt)
			if m == nil {
				line := noFitRE.FindString(txt)
				notes = append(notes, fmt.Sprintf("%s, %s shards (load average %s): %s %s", prof, sh, la, line, strings.TrimSpace(altRE.FindString(txt))))
				continue
			}
			args := strings.Fields(m[1])
			pr, err := plan.ParsePromise(args[len(args)-1])
			if err != nil {
				return err
			}
			r := row{profile: prof, shards: sh, n: pr.VMs, planned: true, predP99: pr.P99, predMem: pr.MemBytes, predEvents: pr.Events,
				exit: code, load: la, promise: pr, verifyCmd: "vasengine " + m[1]}
			measured(&r, txt[strings.Index(txt, "verify: "+strconv.Itoa(pr.VMs)+" VMs"):])
			notes = append(notes, fmt.Sprintf("%s, %s shards: %s", prof, sh, planRE.FindString(txt)))
			rows = append(rows, r)
			// The plan's curve, for predictions at other VM counts.
			curve := plan.Curve{}
			for _, c := range curveRE.FindAllStringSubmatch(txt, -1) {
				n, _ := strconv.Atoi(c[1])
				curve.Points = append(curve.Points, plan.Point{Offered: float64(n) * pr.RatePerVM, P50: dur(c[2]), P99: dur(c[3]), P999: dur(c[4])})
			}
			tablesPerVM, bpt := 0.0, pr.BytesPerTable
			if t := tablesRE.FindStringSubmatch(txt); t != nil {
				tablesPerVM, _ = strconv.ParseFloat(t[1], 64)
			}
			if b := bptRE.FindStringSubmatch(txt); b != nil {
				bpt = parseBytes(b[1])
			}
			for _, n := range []int{max(1, pr.VMs/2), pr.VMs * 3 / 2} {
				if n == pr.VMs {
					continue
				}
				q := pr
				q.VMs = n
				q.Events = float64(n) * pr.RatePerVM
				q.P50, q.P99, q.P999 = curve.QuantilesAt(q.Events)
				q.MemBytes = float64(n) * tablesPerVM * bpt
				q.QueuePeak = pr.QueuePeak / float64(pr.VMs) * float64(n)
				vargs := append([]string{}, args[:len(args)-1]...)
				vargs = append(vargs, q.String())
				la := loadavg()
				txt, code := vasengine(bin, vargs...)
				r := row{profile: prof, shards: sh, n: n, predP99: q.P99, predMem: q.MemBytes, predEvents: q.Events, exit: code, load: la, promise: q}
				measured(&r, txt)
				rows = append(rows, r)
			}
		}
	}
	took := time.Since(start)
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	if err := plotRows(rows, profiles, shards, filepath.Join(out, "capacity.svg")); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(out, "CAPACITY.md"), []byte(report(rows, notes, budget, vdur, took)), 0o644)
}

func pct(pred, meas float64) string {
	if !(pred > 0) || math.IsNaN(meas) {
		return "-"
	}
	return fmt.Sprintf("%+.0f%%", 100*(meas-pred)/pred)
}

func report(rows []row, notes []string, budget, vdur string, took time.Duration) string {
	var b strings.Builder
	host, _ := os.Hostname()
	_ = host
	fmt.Fprintf(&b, "# Capacity plans against runs at their scale (issue 18)\n\n")
	fmt.Fprintf(&b, "Generated by `go run ./bench/capacity -budget %s -verify-duration %s` on %s UTC, in %v.\n\n", budget, vdur, time.Now().UTC().Format("2006-01-02 15:04"), took.Round(time.Second))
	fmt.Fprintf(&b, "- machine: %d CPUs, %s %s/%s, shared with other sessions' work (load average at each run's start in the table)\n", runtime.NumCPU(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
	b.WriteString("- each plan: `vasengine plan -profile P -shards S -budget B -mem 8GiB -verify` (2 vCPUs and 20k events/s per VM, the defaults); its curve is measured at scale (1 s a point, the planned VMs for the verify length), then the planned configuration runs for the verify length. Rows marked `planned` are that run; the others run `plan -verify -promise` at half and 1.5 times the planned VMs, their p99 predicted by interpolating the plan's curve and their memory as VMs x tables per VM x bytes per table.\n")
	fmt.Fprintf(&b, "- goals: p99 within %.0f%% of the prediction, table memory within %.0f%%; exit 1 = the run broke the plan's promise (p99 over the budget, load not sustained, queues or memory over what was kept).\n\n", 100*plan.P99Goal, 100*plan.MemGoal)
	b.WriteString("![capacity](capacity.svg)\n\n")
	b.WriteString("| profile | shards | VMs | predicted p99 | measured p99 | off by | predicted memory | measured memory | off by | events/s predicted / measured | exit | load avg |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rows {
		n := fmt.Sprint(r.n)
		if r.planned {
			n += " (planned)"
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s / %s | %d | %s |\n", r.profile, r.shards, n, plan.Dur(r.predP99), plan.Dur(r.measP99),
			pct(float64(r.predP99), float64(r.measP99)), plan.Bytes(r.predMem), plan.Bytes(r.measMem), pct(r.predMem, r.measMem),
			plan.SI(r.predEvents), plan.SI(r.measEvents), r.exit, r.load)
	}
	b.WriteString("\nThe plans' answers:\n\n")
	for _, n := range notes {
		fmt.Fprintf(&b, "- %s\n", n)
	}
	met, total, memMet := 0, 0, 0
	for _, r := range rows {
		total++
		if math.Abs(float64(r.measP99-r.predP99)) <= plan.P99Goal*float64(r.predP99) {
			met++
		}
		if math.Abs(r.measMem-r.predMem) <= plan.MemGoal*r.predMem {
			memMet++
		}
	}
	fmt.Fprintf(&b, "\np99 within %.0f%%: %d of %d runs; memory within %.0f%%: %d of %d runs.\n", 100*plan.P99Goal, met, total, 100*plan.MemGoal, memMet, total)
	for _, r := range rows {
		if r.planned {
			fmt.Fprintf(&b, "\n%s, %s shards: `%s`\n", r.profile, r.shards, r.verifyCmd)
		}
	}
	return b.String()
}

func plotRows(rows []row, profiles, shards []string, path string) error {
	type key struct{ p, s string }
	by := map[key][]row{}
	for _, r := range rows {
		by[key{r.profile, r.shards}] = append(by[key{r.profile, r.shards}], r)
	}
	w, h := 5*vg.Inch, 3.2*vg.Inch
	c := vgsvg.New(w*2, h*vg.Length(len(profiles)))
	dc := draw.New(c)
	tiles := draw.Tiles{Rows: len(profiles), Cols: 2}
	for i, prof := range profiles {
		for j, what := range []string{"p99 (ms)", "table memory (MiB)"} {
			pl := plot.New()
			pl.Title.Text = fmt.Sprintf("%s: %s against VMs", prof, what)
			pl.X.Label.Text = "VMs"
			pl.Y.Label.Text = what
			for k, sh := range shards {
				rs := by[key{prof, sh}]
				sort.Slice(rs, func(a, b int) bool { return rs[a].n < rs[b].n })
				var pred, meas plotter.XYs
				for _, r := range rs {
					if j == 0 {
						pred = append(pred, plotter.XY{X: float64(r.n), Y: float64(r.predP99) / 1e6})
						meas = append(meas, plotter.XY{X: float64(r.n), Y: float64(r.measP99) / 1e6})
					} else {
						pred = append(pred, plotter.XY{X: float64(r.n), Y: r.predMem / (1 << 20)})
						meas = append(meas, plotter.XY{X: float64(r.n), Y: r.measMem / (1 << 20)})
					}
				}
				if len(pred) == 0 {
					continue
				}
				col := []color.RGBA{{R: 30, G: 90, B: 200, A: 255}, {R: 200, G: 60, B: 30, A: 255}}[k%2]
				lp, sp, err := plotter.NewLinePoints(pred)
				if err != nil {
					return err
				}
				lp.Color, sp.Color = col, col
				lp.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
				lm, sm, err := plotter.NewLinePoints(meas)
				if err != nil {
					return err
				}
				lm.Color, sm.Color = col, col
				sm.Shape = draw.CrossGlyph{}
				pl.Add(lp, sp, lm, sm)
				pl.Legend.Add(sh+" shard(s) predicted", lp, sp)
				pl.Legend.Add(sh+" shard(s) measured", lm, sm)
			}
			pl.Legend.Top, pl.Legend.Left = true, true
			pl.Y.Min = 0
			pl.Draw(tiles.At(dc, j, i))
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := c.WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
