package plan

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/vasengine/vasengine/trace"
	"github.com/vasengine/vasengine/vasmon"
)

// benchLine is a `go test -bench` result line: name, -GOMAXPROCS suffix,
// iterations, then value-unit pairs.
var benchLine = regexp.MustCompile(`^(Benchmark\S+?)(-\d+)?\s+(\d+)\s+(.*)$`)

// ParseReport reads a saved `go test -bench` output (bench/results/bench.txt)
// and returns the cost curve of its BenchmarkLatency/... lines (metrics
// offered-events/s, p50-ns, p99-ns, p999-ns; lines without offered-events/s
// and p99-ns are skipped) and the bytes per table of
// BenchmarkStartMonitor/engine (0 if absent). Of lines named
// BenchmarkLatency/shards=N/..., only those with N == shards are kept (their
// label is what follows); older reports' BenchmarkLatency/load=... lines are
// kept whatever shards is. A name that appears more than once (-count) is
// merged into one point keeping its worst figures.
func ParseReport(r io.Reader, shards int) (pts []Point, bytesPerTable float64, err error) {
	byName := map[string]int{}
	var others []string // shard counts of the lines left out
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		m := benchLine.FindStringSubmatch(strings.TrimSpace(sc.Text()))
		if m == nil {
			continue
		}
		metrics := map[string]float64{}
		f := strings.Fields(m[4])
		for i := 0; i+1 < len(f); i += 2 {
			if v, err := strconv.ParseFloat(f[i], 64); err == nil {
				metrics[f[i+1]] = v
			}
		}
		if m[1] == "BenchmarkStartMonitor/engine" {
			bytesPerTable = max(bytesPerTable, metrics["bytes/table"])
		}
		label, ok := strings.CutPrefix(m[1], "BenchmarkLatency/")
		if rest, sharded := strings.CutPrefix(label, "shards="); ok && sharded {
			n, after, _ := strings.Cut(rest, "/")
			if n != strconv.Itoa(shards) {
				if !slices.Contains(others, n) {
					others = append(others, n)
				}
				continue
			}
			label = after
		}
		offered, ok1 := metrics["offered-events/s"]
		p99, ok2 := metrics["p99-ns"]
		if !ok || !ok1 || !ok2 || offered <= 0 {
			continue
		}
		p := Point{Label: label, Offered: offered, P50: ns(metrics["p50-ns"]), P99: ns(p99), P999: ns(metrics["p999-ns"])}
		if i, dup := byName[label]; dup {
			q := &pts[i]
			q.Offered = min(q.Offered, p.Offered)
			q.P50, q.P99, q.P999 = max(q.P50, p.P50), max(q.P99, p.P99), max(q.P999, p.P999)
			continue
		}
		byName[label] = len(pts)
		pts = append(pts, p)
	}
	if err := sc.Err(); err != nil {
		return nil, 0, err
	}
	if len(pts) == 0 && len(others) > 0 {
		return nil, 0, fmt.Errorf("no latency points for %d shards (the report has them for %s shards)", shards, strings.Join(others, ", "))
	}
	if len(pts) == 0 {
		return nil, 0, errors.New("no latency points (BenchmarkLatency/... lines with offered-events/s and p99-ns)")
	}
	return pts, bytesPerTable, nil
}

func ns(v float64) time.Duration { return time.Duration(math.Round(v)) }

// Snapshot is what a Prometheus text snapshot of vasengine's /metrics says
// about the workload.
type Snapshot struct {
	At, Start     time.Time          // scrape time, process start
	VMs           int                // vasengine_vms
	Submitted     map[string]float64 // vasengine_vm_events_submitted_total by vm label
	Tables, Bytes float64            // vasengine_hooked_tables, vasengine_table_host_bytes
	// Callbacks is vasengine_callback_latency_seconds' count (0: no
	// histogram), P99 an upper bound of its 99th percentile (the bound of
	// the bucket holding it); P99Beyond says it is beyond the last finite
	// bucket (P99 is then that bucket's bound, a lower bound).
	Callbacks float64
	P99       time.Duration
	P99Beyond bool
}

// ParseProm reads a Prometheus text exposition scraped from vasengine's
// /metrics. The scrape time is the samples' timestamp when they carry one
// (a /federate output), else at.
func ParseProm(r io.Reader, at time.Time) (*Snapshot, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(r)
	if err != nil {
		return nil, err
	}
	s := &Snapshot{At: at, Submitted: map[string]float64{}}
	one := func(name string) (float64, bool) {
		f := fams[name]
		if f == nil || len(f.Metric) == 0 {
			return 0, false
		}
		m := f.Metric[0]
		if ts := m.GetTimestampMs(); ts > 0 {
			s.At = time.UnixMilli(ts)
		}
		return value(m), true
	}
	start, ok := one("process_start_time_seconds")
	if !ok {
		return nil, errors.New("no process_start_time_seconds: the uptime is unknown")
	}
	s.Start = time.Unix(0, int64(start*1e9))
	vms, ok := one("vasengine_vms")
	if !ok {
		return nil, errors.New("no vasengine_vms: not a snapshot of vasengine's /metrics")
	}
	s.VMs = int(vms)
	s.Tables, _ = one("vasengine_hooked_tables")
	s.Bytes, _ = one("vasengine_table_host_bytes")
	if f := fams["vasengine_vm_events_submitted_total"]; f != nil {
		for _, m := range f.Metric {
			for _, l := range m.Label {
				if l.GetName() == "vm" {
					s.Submitted[l.GetValue()] += value(m)
				}
			}
		}
	}
	if len(s.Submitted) == 0 {
		return nil, errors.New("no vasengine_vm_events_submitted_total series")
	}
	if f := fams["vasengine_callback_latency_seconds"]; f != nil && len(f.Metric) > 0 && f.Metric[0].Histogram != nil {
		s.Callbacks, s.P99, s.P99Beyond = quantile(f.Metric[0].Histogram, 0.99)
	}
	if !s.At.After(s.Start) {
		return nil, fmt.Errorf("scrape time %v is not after the process start %v", s.At.Format(time.RFC3339), s.Start.Format(time.RFC3339))
	}
	return s, nil
}

// quantile returns a histogram's sample count and an upper bound of its q
// quantile: the bound of the first bucket whose cumulative count reaches
// q of the samples; beyond the last finite bucket, that bucket's bound and
// true.
func quantile(h *dto.Histogram, q float64) (float64, time.Duration, bool) {
	n := float64(h.GetSampleCount())
	if n == 0 {
		return 0, 0, false
	}
	bs := append([]*dto.Bucket(nil), h.Bucket...)
	sort.Slice(bs, func(i, j int) bool { return bs[i].GetUpperBound() < bs[j].GetUpperBound() })
	last := 0.0
	for _, b := range bs {
		if math.IsInf(b.GetUpperBound(), 1) {
			break
		}
		last = b.GetUpperBound()
		if float64(b.GetCumulativeCount()) >= q*n {
			return n, time.Duration(last * 1e9), false
		}
	}
	return n, time.Duration(last * 1e9), true
}

func value(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Untyped != nil:
		return m.Untyped.GetValue()
	}
	return 0
}

// Workload returns the snapshot's workload: events/s per VM are each VM's
// submitted events over the process's uptime; VMs past the engine's label
// limit (vm="other") count as the registered VMs without a label of their
// own. Tables per VM are the hooked tables over the registered VMs; bytes
// per table the table memory over the hooked tables (0 if none). A
// snapshot has no burst: BurstPerVM is 0, for the caller to state.
func (s *Snapshot) Workload() (Workload, float64) {
	up := s.At.Sub(s.Start).Seconds()
	w := Workload{Notes: []string{fmt.Sprintf("rates are averages over the process's uptime (%v)", s.At.Sub(s.Start).Round(time.Second))}}
	var total float64
	labelled := 0
	for vm, n := range s.Submitted {
		total += n
		if vm != "other" {
			labelled++
			w.PeakRate = max(w.PeakRate, n/up)
		}
	}
	w.VMs = labelled
	if other, ok := s.Submitted["other"]; ok {
		k := max(1, s.VMs-labelled)
		w.VMs += k
		w.PeakRate = max(w.PeakRate, other/up/float64(k))
		w.Notes = append(w.Notes, fmt.Sprintf(`vm="other" sums %d VMs, taken as equally busy`, k))
	}
	w.RatePerVM = total / up / float64(w.VMs)
	if s.VMs > 0 {
		w.TablesPerVM = s.Tables / float64(s.VMs)
	}
	var bpt float64
	if s.Tables > 0 {
		bpt = s.Bytes / s.Tables
	}
	return w, bpt
}

// Point returns what the snapshot measured as a point of the cost curve:
// its events/s over the process's uptime and its p99 (false: the snapshot
// has no latency histogram or no callback). The snapshot's histogram covers
// the whole uptime, so the point is the host's own measurement at that
// average load.
func (s *Snapshot) Point() (Point, bool) {
	if s.Callbacks == 0 {
		return Point{}, false
	}
	up := s.At.Sub(s.Start).Seconds()
	var total float64
	for _, n := range s.Submitted {
		total += n
	}
	label := "snapshot"
	if s.P99Beyond {
		label = "snapshot (p99 beyond the histogram)"
	}
	return Point{Label: label, Offered: total / up, Achieved: total / up, P99: s.P99}, true
}

// BurstWindow is the window of a burst.
const BurstWindow = time.Millisecond

// BurstMeter finds the most events within any BurstWindow of a stream of
// event times given in (nearly) ascending order: a time earlier than one
// already seen counts as that one, which is off by the disorder only.
type BurstMeter struct {
	q    []int64
	last int64
	Max  int
}

// Add counts an event at t nanoseconds.
func (b *BurstMeter) Add(t int64) {
	t = max(t, b.last)
	b.last = t
	i := 0
	for i < len(b.q) && b.q[i] <= t-int64(BurstWindow) {
		i++
	}
	b.q = append(b.q[i:], t)
	b.Max = max(b.Max, len(b.q))
}

// ReadTrace reads a whole trace and returns its workload: each VM's events
// over its time in the trace (from its VMAdd, or its first record, to its
// VMRemove, or the trace's last record), the mean over the VMs; tables per
// VM are the distinct table pages the engine read for a VM (Page records),
// which bounds its peak of hooked tables from above; the burst is the
// largest of the VMs'.
func ReadTrace(r *trace.Reader) (Workload, error) {
	type vmInfo struct {
		from, to   int64
		added, end bool
		events     uint64
		pages      map[uint64]bool
		burst      BurstMeter
	}
	vms := map[vasmon.VMID]*vmInfo{}
	var first, last int64 = math.MaxInt64, math.MinInt64
	for {
		rec, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return Workload{}, err
		}
		first, last = min(first, rec.Time), max(last, rec.Time)
		v := vms[rec.VM]
		if v == nil {
			v = &vmInfo{from: rec.Time, pages: map[uint64]bool{}}
			vms[rec.VM] = v
		}
		switch rec.Kind {
		case trace.KindVMAdd:
			if !v.added {
				v.from, v.added = rec.Time, true
			}
		case trace.KindVMRemove:
			v.to, v.end = rec.Time, true
		case trace.KindPage:
			v.pages[rec.GPA] = true
		case trace.KindEvent:
			v.events++
			v.burst.Add(rec.Time)
		}
	}
	if len(vms) == 0 {
		return Workload{}, errors.New("the trace has no VMs")
	}
	w := Workload{VMs: len(vms), Notes: []string{
		"tables per VM: distinct table pages read per VM, an upper bound of the peak hooked",
		"vCPUs per VM are not in a trace: given by -vcpus"}}
	ids := make([]vasmon.VMID, 0, len(vms))
	for id := range vms {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	var rates, tables float64
	var events uint64
	for _, id := range ids {
		v := vms[id]
		if !v.end {
			v.to = last
		}
		span := time.Duration(v.to - v.from)
		var rate float64
		if span > 0 {
			rate = float64(v.events) / span.Seconds()
		} else if v.events > 0 {
			rate = math.Inf(1)
		}
		rates += rate
		w.PeakRate = max(w.PeakRate, rate)
		tables += float64(len(v.pages))
		w.BurstPerVM = max(w.BurstPerVM, float64(v.burst.Max))
		events += v.events
	}
	if math.IsInf(rates, 1) {
		return Workload{}, errors.New("the trace's events all have one time stamp: no rate")
	}
	if events == 0 {
		return Workload{}, errors.New("the trace has no events")
	}
	w.RatePerVM = rates / float64(len(vms))
	w.TablesPerVM = tables / float64(len(vms))
	w.Notes = append(w.Notes, fmt.Sprintf("%d events in %v", events, time.Duration(last-first).Round(time.Millisecond)))
	return w, nil
}
