package plan

import (
	"bytes"
	"fmt"
	"image/color"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// WriteTable writes the plan as text: the cost curve, the workload, every
// constraint with what it admits, and the answer.
func (p *Plan) WriteTable(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "cost curve: %s\n", p.Curve.Source)
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "  point\toffered/s\tachieved/s\tp50\tp99\tp99.9\t\t")
	for _, pt := range p.Curve.sorted() {
		offered, achieved := "closed loop", "-"
		if pt.Offered > 0 {
			offered = SI(pt.Offered)
		}
		if pt.Achieved > 0 {
			achieved = SI(pt.Achieved)
		}
		mark := "within budget"
		switch {
		case pt.Saturated:
			mark = "saturated"
		case pt.P99 > p.Budget:
			mark = "over budget"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", pt.Label, offered, achieved, dur(pt.P50), dur(pt.P99), dur(pt.P999), mark)
	}
	tw.Flush()
	for _, n := range p.Curve.Notes {
		fmt.Fprintf(&b, "  note: %s\n", n)
	}
	if len(p.Inversions) > 0 {
		b.WriteString("  WARNING: the curve is not monotone, a measurement problem (latency does not fall as load rises):\n")
		for _, inv := range p.Inversions {
			fmt.Fprintf(&b, "    p99 %s at %s events/s (%s), then %s at %s events/s (%s)\n", dur(inv.Lighter.P99), SI(inv.Lighter.Rate()),
				inv.Lighter.Label, dur(inv.Heavier.P99), SI(inv.Heavier.Rate()), inv.Heavier.Label)
		}
		b.WriteString("  the host was disturbed while measuring, or its workers park between events at light load; the plan takes\n" +
			"  the first crossing of the budget (conservative) and is not to be trusted: measure again, longer, on a quiet host\n")
	} else if p.Curve.disturbed(p.Budget) {
		b.WriteString("  note: a point over the budget is followed by a heavier one within it: the host was probably disturbed\n" +
			"  while measuring; the plan takes the first crossing (conservative): measure again, longer, on a quiet host\n")
	}
	fmt.Fprintf(&b, "rate within the budget (p99 <= %v): ", p.Budget)
	switch {
	case p.RateWithin == 0:
		fmt.Fprintf(&b, "none: the lightest load measured already exceeds it\n")
	case !p.Bounded:
		fmt.Fprintf(&b, "at least %s events/s (no point measured exceeds the budget)\n", SI(p.RateWithin))
	default:
		fmt.Fprintf(&b, "%s events/s\n", SI(p.RateWithin))
	}

	wl := p.Workload
	fmt.Fprintf(&b, "\nworkload: %s\n  per VM: %s events/s", wl.Source, SI(wl.RatePerVM))
	if wl.PeakRate > 0 && wl.VMs > 1 {
		fmt.Fprintf(&b, " (busiest of %d VMs: %s)", wl.VMs, SI(wl.PeakRate))
	}
	fmt.Fprintf(&b, ", %.0f tables, burst of %.0f events in %v, %d vCPUs\n", wl.TablesPerVM, wl.BurstPerVM, BurstWindow, max(wl.VCPUsPerVM, 1))
	for _, n := range wl.Notes {
		fmt.Fprintf(&b, "  note: %s\n", n)
	}
	if l := p.Limits; l.MaxRate > 0 || l.Share > 0 {
		b.WriteString("  per-VM limits:")
		if l.MaxRate > 0 {
			fmt.Fprintf(&b, " at most %s events/s (burst %.0f): every VM is planned at its limit, whatever its workload", SI(l.MaxRate), l.MaxBurst)
			if wl.RatePerVM > l.MaxRate {
				fmt.Fprintf(&b, " (this workload's %s events/s would be throttled to it)", SI(wl.RatePerVM))
			}
			if l.Share > 0 {
				b.WriteString(";")
			}
		}
		if l.Share > 0 {
			fmt.Fprintf(&b, " a share of %d events of each shard queue per VM (fair ingest gives each of n VMs queue depth / 2n)", l.Share)
			burst := p.Constraints[1].Need // Queues: the burst, limited
			if per := burst / float64(max(p.Shards, 1)); per > float64(l.Share) {
				fmt.Fprintf(&b, "; a burst of %.0f events is about %.0f per shard, more than the share: such bursts wait once a queue is half full", burst, per)
			}
		}
		b.WriteString("\n")
	}

	fmt.Fprintf(&b, "\nhost: %d shards x queue depth %d, %s for tables at %s per table; headroom %.0f%% of each resource kept free\n",
		p.Shards, p.QueueDepth, Bytes(p.MemBytes), Bytes(p.BytesPerTable), 100*p.Headroom)
	for _, n := range p.Notes {
		if n != "" {
			fmt.Fprintf(&b, "  note: %s\n", n)
		}
	}
	b.WriteString("\n")
	tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "constraint\tper VM\thost, after headroom\tVMs\tuse at plan\t\t")
	for i, c := range p.Constraints {
		need, have := SI(c.Need)+" "+c.Unit, SI(c.Have)+" "+c.Unit
		switch c.Name {
		case Memory:
			need = fmt.Sprintf("%.0f tables = %s", p.Workload.TablesPerVM, Bytes(c.Need))
			have = Bytes(c.Have)
		case Queues:
			need = fmt.Sprintf("%.0f events burst", c.Need)
		case QueueShare:
			need, have = fmt.Sprintf("2 x %d events", p.Limits.Share), fmt.Sprintf("%d events per shard (no headroom)", int(c.Have))
		case VMSlots:
			need, have = "1 slot", fmt.Sprintf("%d slots (no headroom)", int(c.Have))
		}
		use := "-"
		if p.VMs < Unbounded {
			use = fmt.Sprintf("%.0f%%", 100*c.Use(p.VMs, p.Headroom))
		}
		bind := ""
		if i == p.Binding && p.VMs < Unbounded {
			bind = "<- binding"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t\n", c.Name, need, have, count(c.VMs), use, bind)
	}
	tw.Flush()
	b.WriteString("  cpu: rate within the budget / rate per VM; queues: a burst of every VM at once fits in the queues\n" +
		"  (draining ignored); memory: tables per VM x bytes per table; vm slots: the engine's MaxVMs\n")
	if p.Limits.Share > 0 {
		b.WriteString("  queue share: fair ingest gives each VM queue depth / (2 x VMs) of every shard queue\n")
	}
	bind := p.Constraints[p.Binding].Name
	switch {
	case p.VMs == Unbounded:
		fmt.Fprintf(&b, "\nplan: unbounded: the workload uses none of the constrained resources\n")
	case p.VMs == 0:
		fmt.Fprintf(&b, "\nplan: no VM fits within the budget of %v, bound by %s\n", p.Budget, bind)
		if ps := p.Curve.sorted(); bind == CPU && p.RateWithin == 0 && len(ps) > 0 && !ps[0].Saturated && ps[0].P99 > p.Budget {
			fmt.Fprintf(&b, "  this engine does not meet a p99 of %v on this host: the lightest load measured (%s, %s events/s) had p99 %s\n",
				p.Budget, ps[0].Label, SI(ps[0].Rate()), dur(ps[0].P99))
		}
		if len(p.Alternatives) == 0 {
			b.WriteString("  no budget the curve measured would fit one: the binding resource is not the latency\n")
		}
		for _, a := range p.Alternatives {
			fmt.Fprintf(&b, "  a budget of %s would fit %d VMs (bound by %s)\n", dur(a.Budget), a.VMs, a.Binding)
		}
	default:
		about := "about"
		if ps := p.Curve.sorted(); p.Load < ps[0].Rate() {
			about = "at most" // below the lightest load measured
		}
		fmt.Fprintf(&b, "\nplan: %d VMs (%d vCPUs), bound by %s; at that load (%s events/s) the curve's p99 is %s %v (budget %v)\n",
			p.VMs, p.VCPUs, bind, SI(p.Load), about, dur(p.LoadP99), p.Budget)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func count(n int) string {
	if n == Unbounded {
		return "unbounded"
	}
	return fmt.Sprint(n)
}

// Dur formats a latency for a report (µs, ms or s with 2-3 digits).
func Dur(d time.Duration) string { return dur(d) }

func dur(d time.Duration) string {
	switch {
	case d >= time.Second:
		return fmt.Sprintf("%.2fs", d.Seconds())
	case d >= time.Millisecond:
		return fmt.Sprintf("%.2fms", float64(d)/1e6)
	case d >= time.Microsecond:
		return fmt.Sprintf("%.1fµs", float64(d)/1e3)
	}
	return d.String()
}

// SI formats v with a k, M or G suffix.
func SI(v float64) string {
	switch {
	case v >= 1e9:
		return fmt.Sprintf("%.2fG", v/1e9)
	case v >= 1e6:
		return fmt.Sprintf("%.2fM", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%.1fk", v/1e3)
	}
	return fmt.Sprintf("%.0f", v)
}

// Bytes formats a byte count in binary units.
func Bytes(b float64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.2f GiB", b/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1f MiB", b/(1<<20))
	case b >= 1<<10:
		return fmt.Sprintf("%.1f KiB", b/(1<<10))
	}
	return fmt.Sprintf("%.0f B", b)
}

// PlotSVG returns the plot of WritePlot as SVG.
func (p *Plan) PlotSVG() ([]byte, error) {
	pl, err := p.plot()
	if err != nil {
		return nil, err
	}
	w, err := pl.WriterTo(8*vg.Inch, 4.5*vg.Inch, "svg")
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if _, err := w.WriteTo(&buf); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// WritePlot writes an SVG (or, by path's extension, PNG or PDF) plot of the
// curve: latency percentiles against the rate, the budget, the rate within
// it and the plan's operating point.
func (p *Plan) WritePlot(path string) error {
	pl, err := p.plot()
	if err != nil {
		return err
	}
	return pl.Save(8*vg.Inch, 4.5*vg.Inch, path)
}

func (p *Plan) plot() (*plot.Plot, error) {
	pl := plot.New()
	pl.Title.Text = fmt.Sprintf("Trap-to-callback latency against load; plan: %s VMs (%s)", count(p.VMs), p.Constraints[p.Binding].Name)
	pl.X.Label.Text = "events/s processed (thousands)"
	pl.Y.Label.Text = "latency (µs, log scale)"
	pl.Y.Scale = plot.LogScale{}
	pl.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	us := func(d time.Duration) float64 { return max(float64(d)/1e3, 0.01) }
	ps := p.Curve.sorted()
	var lines []any
	lo, hi := us(p.Budget), us(p.Budget)
	for _, q := range []struct {
		label string
		get   func(Point) time.Duration
	}{{"p50", func(x Point) time.Duration { return x.P50 }}, {"p99", func(x Point) time.Duration { return x.P99 }},
		{"p99.9", func(x Point) time.Duration { return x.P999 }}} {
		var xy plotter.XYs
		for _, pt := range ps {
			y := us(q.get(pt))
			lo, hi = min(lo, y), max(hi, y)
			xy = append(xy, plotter.XY{X: pt.Rate() / 1e3, Y: y})
		}
		lines = append(lines, q.label, xy)
	}
	if err := plotutil.AddLinePoints(pl, lines...); err != nil {
		return nil, err
	}
	var sat plotter.XYs
	for _, pt := range ps {
		if pt.Saturated {
			sat = append(sat, plotter.XY{X: pt.Rate() / 1e3, Y: us(pt.P99)})
		}
	}
	if len(sat) > 0 {
		s, err := plotter.NewScatter(sat)
		if err != nil {
			return nil, err
		}
		s.GlyphStyle.Shape, s.GlyphStyle.Radius = draw.CrossGlyph{}, vg.Points(6)
		pl.Add(s)
		pl.Legend.Add("saturated", s)
	}
	budget := plotter.NewFunction(func(float64) float64 { return us(p.Budget) })
	budget.Dashes = []vg.Length{vg.Points(4), vg.Points(4)}
	pl.Add(budget)
	pl.Legend.Add(fmt.Sprintf("budget %v", p.Budget), budget)
	if p.RateWithin > 0 {
		v, err := plotter.NewLine(plotter.XYs{{X: p.RateWithin / 1e3, Y: lo}, {X: p.RateWithin / 1e3, Y: hi}})
		if err != nil {
			return nil, err
		}
		v.Dashes = []vg.Length{vg.Points(1), vg.Points(3)}
		pl.Add(v)
		label := fmt.Sprintf("within budget up to %s events/s", SI(p.RateWithin))
		if !p.Bounded {
			label = fmt.Sprintf("within budget up to at least %s events/s", SI(p.RateWithin))
		}
		pl.Legend.Add(label, v)
	}
	if p.VMs < Unbounded && p.Load > 0 {
		s, err := plotter.NewScatter(plotter.XYs{{X: p.Load / 1e3, Y: us(p.LoadP99)}})
		if err != nil {
			return nil, err
		}
		s.GlyphStyle.Shape, s.GlyphStyle.Radius = draw.PyramidGlyph{}, vg.Points(5)
		s.GlyphStyle.Color = color.RGBA{R: 200, A: 255}
		pl.Add(s)
		pl.Legend.Add(fmt.Sprintf("plan: %d VMs, %s events/s", p.VMs, SI(p.Load)), s)
	}
	pl.X.Min = 0
	pl.Y.Min, pl.Y.Max = lo/2, hi*100 // room above the lines for the legend
	pl.Legend.Top, pl.Legend.Left = true, true
	return pl, nil
}
