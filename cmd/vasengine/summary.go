package main

import (
	"fmt"
	"io"
	"runtime"
	"text/tabwriter"
	"time"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/plan"
	"github.com/vasengine/vasengine/vasmon"
)

// progress prints a live line (rewritten in place on a terminal, one line
// per second otherwise) and remembers the peaks the summary reports.
type progress struct {
	e         *engine.Engine
	w         io.Writer
	tty       bool
	last      time.Time
	lastN     uint64
	start     time.Time
	peakTabs  int64
	peakBytes int64
	peakVM    map[vasmon.VMID]int64
	printed   bool
}

func newProgress(e *engine.Engine, w io.Writer, tty bool) *progress {
	now := time.Now()
	return &progress{e: e, w: w, tty: tty, last: now, start: now, peakVM: map[vasmon.VMID]int64{}}
}

func (p *progress) sample() {
	st := p.e.Stats()
	if st.Tables > p.peakTabs {
		p.peakTabs, p.peakBytes = st.Tables, st.HostBytes
	}
	for _, v := range st.PerVM {
		p.peakVM[v.ID] = max(p.peakVM[v.ID], v.Tables)
	}
	now := time.Now()
	dt := now.Sub(p.last)
	if dt < time.Second {
		return
	}
	rate := float64(st.Processed-p.lastN) / dt.Seconds()
	p.last, p.lastN = now, st.Processed
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	budget := p.e.Config().Budget
	p99 := time.Duration(st.Latency.Quantile(0.99))
	mark := "ok"
	if p99 > budget {
		mark = "OVER"
	}
	line := fmt.Sprintf("%6.1fs  %s events/s  p99 %v (budget %v %s)  tables %d  table memory %s  heap %s",
		now.Sub(p.start).Seconds(), si(rate), p99, budget, mark, st.Tables, bytesStr(st.HostBytes), bytesStr(int64(ms.HeapInuse)))
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s", line)
	} else {
		fmt.Fprintln(p.w, line)
	}
	p.printed = true
}

func (p *progress) finish() {
	if p.tty && p.printed {
		fmt.Fprintln(p.w)
	}
}

func si(v float64) string { return plan.SI(v) }

func bytesStr(b int64) string { return plan.Bytes(float64(b)) }

// printSummary prints the run's summary table: per VM and in total, events
// by kind, callbacks, tables; then latency against the budget and memory.
func printSummary(w io.Writer, e *engine.Engine, p *progress, elapsed time.Duration) {
	st := e.Stats()
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "vm\tevents\trelevant\tirrelevant\tpartial\tduplicate\tuntracked\trejected\tcallbacks\tp50 <=\tp99 <=\tover budget\tpeak tables\trefused\t")
	var tot engine.VMStats
	for _, v := range st.PerVM {
		row(tw, fmt.Sprint(v.ID), &v, p.peakVM[v.ID])
		tot.Submitted += v.Submitted
		tot.Rejected += v.Rejected
		for k := range v.Kinds {
			tot.Kinds[k] += v.Kinds[k]
		}
		tot.Callbacks += v.Callbacks
		tot.OverBudget += v.OverBudget
		for b := range v.Latency {
			tot.Latency[b] += v.Latency[b]
		}
		tot.Refused += v.Refused
	}
	row(tw, "total", &tot, p.peakTabs)
	tw.Flush()
	l := &st.Latency
	fmt.Fprintf(w, "\n%s events in %.1fs: %s events/s; submitted %d = processed %d + rejected %d\n",
		si(float64(st.Processed)), elapsed.Seconds(), si(float64(st.Processed)/elapsed.Seconds()), st.Submitted, st.Processed, st.Rejected)
	fmt.Fprintf(w, "trap-to-callback latency: p50 %v  p99 %v  p99.9 %v  max %v; budget %v, violated by %d of %d callbacks (%.3f%%)\n",
		time.Duration(l.Quantile(0.5)), time.Duration(l.Quantile(0.99)), time.Duration(l.Quantile(0.999)), time.Duration(l.Max()),
		e.Config().Budget, st.OverBudget, st.Callbacks, pct(st.OverBudget, st.Callbacks))
	perTable := int64(0)
	if p.peakTabs > 0 {
		perTable = p.peakBytes / p.peakTabs
	}
	fmt.Fprintf(w, "tables: peak %d hooked, %s of host memory, %d bytes per table; %d hooks, %d unhooks (%.3f per event); %d shards, %d callback panics\n",
		p.peakTabs, bytesStr(p.peakBytes), perTable, st.Hooks, st.Unhooks,
		float64(st.Hooks+st.Unhooks)/float64(max(1, st.Processed)), len(e.Shards()), st.Panics)
}

func row(tw io.Writer, name string, v *engine.VMStats, peak int64) {
	k := v.Kinds
	fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%v\t%v\t%.1f%%\t%d\t%d\t\n", name, v.Events(),
		k[vasmon.WriteRelevant], k[vasmon.WriteIrrelevant], k[vasmon.WritePartial], k[vasmon.WriteDuplicate],
		k[vasmon.WriteUntracked], v.Rejected, v.Callbacks, v.LatencyQuantile(0.5), v.LatencyQuantile(0.99),
		pct(v.OverBudget, v.Callbacks), peak, v.Refused)
}

func pct(a, b uint64) float64 {
	if b == 0 {
		return 0
	}
	return 100 * float64(a) / float64(b)
}
