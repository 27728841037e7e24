package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/plan"
	"github.com/vasengine/vasengine/vasmon"
)

// progress prints a live line (rewritten in place on a terminal, one line
// per second otherwise) and remembers the peaks the summary reports. It is
// safe for concurrent use.
type progress struct {
	e   *engine.Engine
	s   *session
	tty bool

	mu        sync.Mutex
	last      time.Time
	lastN     uint64
	start     time.Time
	peakTabs  int64
	peakBytes int64
	peakVM    map[vasmon.VMID]int64
	peakFlood map[vasmon.VMID]int64 // flooded pages
	printed   bool
}

func newProgress(e *engine.Engine, s *session, tty bool) *progress {
	now := time.Now()
	return &progress{e: e, s: s, tty: tty, last: now, start: now, peakVM: map[vasmon.VMID]int64{}, peakFlood: map[vasmon.VMID]int64{}}
}

func (p *progress) sample() {
	st := p.e.Stats()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	p.mu.Lock()
	defer p.mu.Unlock()
	if st.Tables > p.peakTabs {
		p.peakTabs, p.peakBytes = st.Tables, st.HostBytes
	}
	for _, v := range st.PerVM {
		p.peakVM[v.ID] = max(p.peakVM[v.ID], v.Tables)
		p.peakFlood[v.ID] = max(p.peakFlood[v.ID], v.Flooded)
	}
	now := time.Now()
	dt := now.Sub(p.last)
	if dt < time.Second {
		return
	}
	rate := float64(st.Processed-p.lastN) / dt.Seconds()
	p.last, p.lastN = now, st.Processed
	budget := p.e.Config().Budget
	p99 := time.Duration(st.Latency.Quantile(0.99))
	mark := "ok"
	if p99 > budget {
		mark = "OVER"
	}
	line := fmt.Sprintf("%6.1fs  %s events/s  p99 %v (budget %v %s)  tables %d  table memory %s  heap %s",
		now.Sub(p.start).Seconds(), si(rate), p99, budget, mark, st.Tables, bytesStr(st.HostBytes), bytesStr(int64(ms.HeapInuse)))
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	if p.s.abandoned {
		return
	}
	if p.tty {
		fmt.Fprintf(p.s.stderr, "\r\033[K%s", line)
	} else {
		fmt.Fprintln(p.s.stderr, line)
	}
	p.printed = true
}

func (p *progress) finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	if p.tty && p.printed && !p.s.abandoned {
		fmt.Fprintln(p.s.stderr)
	}
}

func (p *progress) peaks() (tables, bytes int64, perVM map[vasmon.VMID]int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	perVM = make(map[vasmon.VMID]int64, len(p.peakVM))
	for k, v := range p.peakVM {
		perVM[k] = v
	}
	return p.peakTabs, p.peakBytes, perVM
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

func si(v float64) string { return plan.SI(v) }

func bytesStr(b int64) string { return plan.Bytes(float64(b)) }

// The JSON summary (-json): one document, schema "vasengine-summary". The
// version changes with any change a reader of the previous version would
// misread; fields are only added within a version. README's Usage section
// documents every field.
const (
	summarySchema  = "vasengine-summary"
	summaryVersion = 1
)

type summary struct {
	Schema     string     `json:"schema"`
	Version    int        `json:"version"`
	Command    string     `json:"command"`
	Build      buildInfo  `json:"build"`
	Config     sumConfig  `json:"config"`
	Ended      sumEnded   `json:"ended"`
	Events     sumEvents  `json:"events"`
	Kinds      sumKinds   `json:"kinds"`
	Callbacks  uint64     `json:"callbacks"`
	OverBudget uint64     `json:"over_budget"`
	Panics     uint64     `json:"callback_panics"`
	Latency    sumLatency `json:"latency_ns"`
	Sync       *sumSync   `json:"sync,omitempty"`
	Tables     sumTables  `json:"tables"`
	Guest      sumGuest   `json:"guest_memory"`
	Workers    sumWorkers `json:"workers"`
	Limits     sumLimits  `json:"limits"`
	// Stream: the event pipeline's totals (-events-out, -nats); absent
	// without one.
	Stream       *sumStream `json:"event_stream,omitempty"`
	VMs          []sumVM    `json:"vms"`
	BackendStats any        `json:"backend_stats"`
	Warnings     []string   `json:"warnings"`
	Errors       []string   `json:"errors"`

	backendLines []string
	ran          time.Duration // from the backend's start to the drain's end (or now)
	failErr      error
	noEngine     bool
}

type sumConfig struct {
	Backend     string `json:"backend"`
	Shards      int    `json:"shards"`
	QueueDepth  int    `json:"queue_depth"`
	Batch       int    `json:"batch"`
	BudgetNs    int64  `json:"budget_ns"`
	NonBlocking bool   `json:"nonblocking"`
	DurationNs  int64  `json:"duration_ns"`
	Sync        bool   `json:"sync"`
}

// sumStream: the event pipeline's totals (package events).
type sumStream struct {
	Records      uint64         `json:"records"`       // records the pipeline took from the callbacks
	HandoffDrops uint64         `json:"handoff_drops"` // dropped before the rules (a full lane, -on-full drop)
	Matched      uint64         `json:"matched"`       // rule matches (a record matching two rules counts two)
	Sinks        []sumEventSink `json:"sinks"`
}

type sumEventSink struct {
	Name    string `json:"name"`
	Emitted uint64 `json:"emitted"`
	Dropped uint64 `json:"dropped"`
	Spooled uint64 `json:"spooled"`
	Acked   uint64 `json:"acked"`
	Errors  uint64 `json:"errors"`
}

// sumWorkers: where the shard workers ran and what sharing cost them.
type sumWorkers struct {
	// CPUs: per shard, the host CPU its worker is pinned to, -1 unpinned.
	CPUs []int `json:"cpus"`
	// Steals: shard steps run by another thread than the shard's worker
	// (an idle peer, a synchronous submitter, a producer finding it full).
	Steals uint64 `json:"steals"`
	// SpinNs: time the workers spent polling idle queues.
	SpinNs int64 `json:"spin_ns"`
}

type sumEnded struct {
	// Cause: "signal", "duration", "backend" (the backend finished by
	// itself: its -events, its trace's end, its guests' power-off),
	// "error" (a trace write error stopped the run).
	Cause       string `json:"cause"`
	Signal      string `json:"signal,omitempty"`
	Reason      string `json:"reason,omitempty"` // for cause "error"
	Interrupted bool   `json:"interrupted"`
	ElapsedNs   int64  `json:"elapsed_ns"`
	StopNs      int64  `json:"stop_ns,omitempty"`
	// Complete: the backend returned, the engine drained every queued
	// event and every output was written.
	Complete       bool     `json:"complete"`
	BackendAborted bool     `json:"backend_aborted"`
	Abandoned      []string `json:"abandoned"`
	Phase          string   `json:"phase,omitempty"`
}

type sumEvents struct {
	Submitted   uint64  `json:"submitted"`
	Processed   uint64  `json:"processed"`
	Rejected    uint64  `json:"rejected"`
	Unprocessed uint64  `json:"unprocessed"`
	PerSecond   float64 `json:"per_second"`
}

type sumKinds struct {
	Relevant   uint64 `json:"relevant"`
	Irrelevant uint64 `json:"irrelevant"`
	Partial    uint64 `json:"partial"`
	Duplicate  uint64 `json:"duplicate"`
	Untracked  uint64 `json:"untracked"`
}

func kindsOf(k [5]uint64) sumKinds {
	return sumKinds{k[vasmon.WriteRelevant], k[vasmon.WriteIrrelevant], k[vasmon.WritePartial], k[vasmon.WriteDuplicate], k[vasmon.WriteUntracked]}
}

type sumLatency struct {
	P50    int64 `json:"p50"`
	P99    int64 `json:"p99"`
	P999   int64 `json:"p999"`
	Max    int64 `json:"max"`
	Budget int64 `json:"budget"`
}

// sumSync is synchronous delivery's part (-sync, or any synchronous write):
// the stall from trap to the vCPU's release, and the writes by verdict.
type sumSync struct {
	Writes  uint64 `json:"writes"`
	P50Ns   int64  `json:"p50_ns"`
	P99Ns   int64  `json:"p99_ns"`
	P999Ns  int64  `json:"p999_ns"`
	MaxNs   int64  `json:"max_ns"`
	Allowed uint64 `json:"allowed"`
	Denied  uint64 `json:"denied"`
}

type sumTables struct {
	Peak          int64  `json:"peak"`
	PeakHostBytes int64  `json:"peak_host_bytes"`
	BytesPerTable int64  `json:"bytes_per_table"`
	Hooks         uint64 `json:"hooks"`
	Unhooks       uint64 `json:"unhooks"`
}

// sumGuest counts what the engine did because guest memory moved on while
// its events were queued (SEMANTICS.md section 6, "No phantoms").
type sumGuest struct {
	StaleWrites    uint64 `json:"stale_writes"`
	StaleReads     uint64 `json:"stale_reads"`
	Resyncs        uint64 `json:"resyncs"`
	ExpiredPartial uint64 `json:"expired_partial"`
}

type sumVM struct {
	ID         uint32   `json:"id"`
	Events     uint64   `json:"events"`
	Kinds      sumKinds `json:"kinds"`
	Submitted  uint64   `json:"submitted"`
	Rejected   uint64   `json:"rejected"`
	Callbacks  uint64   `json:"callbacks"`
	OverBudget uint64   `json:"over_budget"`
	P50Ns      int64    `json:"p50_ns"`
	P99Ns      int64    `json:"p99_ns"`
	PeakTables int64    `json:"peak_tables"`
	Refused    int64    `json:"refused"`
	Removed    bool     `json:"removed"`
	// Throttled: events held or refused by -vm-max-rate, the time held;
	// FloodedPeak: the most pages flooded at once (sampled).
	Throttled      uint64 `json:"throttled"`
	ThrottleWaitNs int64  `json:"throttle_wait_ns"`
	FloodedPeak    int64  `json:"flooded_pages_peak"`
}

// summarize builds the summary of the session.
func (s *session) summarize(e *engine.Engine, prog *progress, o outcome, finished bool, phase string) *summary {
	now := time.Now()
	sum := &summary{Schema: summarySchema, Version: summaryVersion, Command: s.command, Build: readBuildInfo(),
		Config: sumConfig{Backend: backendName(s.b), Shards: s.cfg.Shards, QueueDepth: s.cfg.QueueDepth, Batch: s.cfg.MaxBatch,
			BudgetNs: int64(s.cfg.Budget), NonBlocking: s.cfg.NonBlocking, DurationNs: int64(s.duration), Sync: s.flags.sync},
		VMs: []sumVM{}, Warnings: []string{}, Errors: []string{}}
	s.mu.Lock()
	cause, stopAt := s.cause, s.stopAt
	s.mu.Unlock()
	en := &sum.Ended
	en.ElapsedNs = int64(now.Sub(s.start))
	en.Abandoned = []string{}
	switch {
	case stopAt.IsZero() || (!o.backendEnd.IsZero() && o.backendEnd.Before(stopAt) && o.drained):
		en.Cause = "backend"
	case cause == "SIGINT" || cause == "SIGTERM":
		en.Cause, en.Signal, en.Interrupted = "signal", cause, true
	case cause == "duration":
		en.Cause, en.Interrupted = "duration", true
	default:
		en.Cause, en.Reason, en.Interrupted = "error", cause, true
	}
	if !stopAt.IsZero() {
		en.StopNs = int64(now.Sub(stopAt))
	}
	en.BackendAborted = o.aborted
	if !finished {
		en.Abandoned = append(en.Abandoned, "run")
		en.Phase = phase
	}
	if o.backendEnd.IsZero() && !o.backendStart.IsZero() {
		en.Abandoned = append(en.Abandoned, "backend")
	}
	if !o.drained && e != nil && o.setupErr == nil && !o.backendStart.IsZero() {
		en.Abandoned = append(en.Abandoned, "drain")
	}
	if s.traceOut != nil && !o.traceDone && o.traceErr == nil {
		en.Abandoned = append(en.Abandoned, "trace")
	}
	en.Complete = len(en.Abandoned) == 0 && o.setupErr == nil && o.traceErr == nil && o.profErr == nil && o.eventsErr == nil

	var errs []error
	if o.setupErr != nil {
		errs = append(errs, o.setupErr)
	}
	if err := o.backendErr; err != nil && !isInterrupt(err) && !(o.aborted && errors.Is(err, engine.ErrClosed)) {
		errs = append(errs, fmt.Errorf("%s backend: %w", sum.Config.Backend, err))
	}
	if o.traceErr != nil {
		errs = append(errs, fmt.Errorf("the trace was not written: %w", o.traceErr))
	}
	if o.eventsErr != nil {
		errs = append(errs, o.eventsErr)
	}
	if o.profErr != nil {
		errs = append(errs, o.profErr)
	}
	if len(en.Abandoned) > 0 {
		errs = append(errs, fmt.Errorf("the run did not stop cleanly within %v of the stop request: %s abandoned", hardDeadline.Round(50*time.Millisecond), strings.Join(en.Abandoned, ", ")))
	}
	for _, err := range errs {
		sum.Errors = append(sum.Errors, oneLine(err.Error()))
	}
	sum.failErr = errors.Join(errs...)

	if e == nil {
		sum.noEngine = true
		return sum
	}
	st := e.Stats()
	ran := now.Sub(o.backendStart)
	if !o.drainEnd.IsZero() {
		ran = o.drainEnd.Sub(o.backendStart)
	}
	if o.backendStart.IsZero() {
		ran = 0
	}
	sum.ran = ran
	sum.Events = sumEvents{Submitted: st.Submitted, Processed: st.Processed, Rejected: st.Rejected}
	if st.Submitted > st.Processed+st.Rejected {
		sum.Events.Unprocessed = st.Submitted - st.Processed - st.Rejected
	}
	if ran > 0 {
		sum.Events.PerSecond = float64(st.Processed) / ran.Seconds()
	}
	sum.Kinds = kindsOf(st.Kinds)
	sum.Callbacks, sum.OverBudget, sum.Panics = st.Callbacks, st.OverBudget, st.Panics
	l := &st.Latency
	sum.Latency = sumLatency{P50: int64(l.Quantile(0.5)), P99: int64(l.Quantile(0.99)), P999: int64(l.Quantile(0.999)), Max: int64(l.Max()), Budget: int64(s.cfg.Budget)}
	if ss := &st.SyncStall; ss.Count() > 0 || s.flags.sync {
		sum.Sync = &sumSync{Writes: ss.Count(), P50Ns: ss.Quantile(0.5), P99Ns: ss.Quantile(0.99), P999Ns: ss.Quantile(0.999),
			MaxNs: ss.Max(), Allowed: st.Allowed, Denied: st.Denied}
	}
	var peakTabs, peakBytes int64
	peakVM := map[vasmon.VMID]int64{}
	if prog != nil {
		peakTabs, peakBytes, peakVM = prog.peaks()
	}
	if st.Tables > peakTabs {
		peakTabs, peakBytes = st.Tables, st.HostBytes
	}
	sum.Tables = sumTables{Peak: peakTabs, PeakHostBytes: peakBytes, Hooks: st.Hooks, Unhooks: st.Unhooks}
	if es := o.eventStats; es != nil {
		ev := &sumStream{Records: es.Records, HandoffDrops: es.HandoffDrops, Matched: es.Matched, Sinks: []sumEventSink{}}
		for _, k := range es.Sinks {
			ev.Sinks = append(ev.Sinks, sumEventSink{Name: k.Name, Emitted: k.Emitted, Dropped: k.Dropped, Spooled: k.Spooled, Acked: k.Acked, Errors: k.Errors})
		}
		sum.Stream = ev
	}
	sum.Workers = sumWorkers{CPUs: []int{}, Steals: st.Steals, SpinNs: int64(st.Spin)}
	for _, sh := range e.Shards() {
		sum.Workers.CPUs = append(sum.Workers.CPUs, sh.CPU())
	}
	sum.Guest = sumGuest{StaleWrites: st.StaleWrites, StaleReads: st.StaleReads, Resyncs: st.Resyncs, ExpiredPartial: st.Expired}
	if peakTabs > 0 {
		sum.Tables.BytesPerTable = peakBytes / peakTabs
	}
	for _, v := range st.PerVM {
		sum.VMs = append(sum.VMs, sumVM{ID: uint32(v.ID), Events: v.Events(), Kinds: kindsOf(v.Kinds), Submitted: v.Submitted,
			Rejected: v.Rejected, Callbacks: v.Callbacks, OverBudget: v.OverBudget, P50Ns: int64(v.LatencyQuantile(0.5)),
			P99Ns: int64(v.LatencyQuantile(0.99)), PeakTables: max(peakVM[v.ID], v.Tables), Refused: v.Refused, Removed: v.Removed})
	}
	s.summarizeLimits(sum, st, prog)
	if !o.backendStart.IsZero() {
		r := s.b.report(now.Sub(o.backendStart))
		sum.BackendStats, sum.backendLines = r.Stats, r.Lines
		sum.Warnings = append(sum.Warnings, r.Warnings...)
	}
	return sum
}

func backendName(b backend) string {
	switch b.(type) {
	case *simBackend:
		return "sim"
	case *kvmBackend:
		return "kvm"
	case *qemuBackend:
		return "qemu"
	case *replayBackend:
		return "replay"
	}
	return "unknown"
}

// failure is the run's error for the exit status (nil: exit 0).
func (sum *summary) failure() error { return sum.failErr }

func (sum *summary) writeJSON(w io.Writer) error {
	b, err := json.MarshalIndent(sum, "", "  ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// writeText prints the summary table: the top VMs by events, the others in
// one row, the total; then accounting, latency, tables, the backend's lines
// and how the run ended.
func (sum *summary) writeText(w io.Writer, top int) error {
	ew := &errWriter{w: w}
	if !sum.noEngine {
		tw := tabwriter.NewWriter(ew, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "vm\tevents\trelevant\tirrelevant\tpartial\tduplicate\tuntracked\trejected\tcallbacks\tp50 <=\tp99 <=\tover budget\tpeak tables\trefused\t")
		vms := append([]sumVM(nil), sum.VMs...)
		var rest []sumVM
		if top > 0 && len(vms) > top+1 {
			sort.SliceStable(vms, func(i, j int) bool { return vms[i].Events > vms[j].Events })
			vms, rest = vms[:top], vms[top:]
			sort.SliceStable(vms, func(i, j int) bool { return vms[i].ID < vms[j].ID })
		}
		var tot sumVM
		add := func(acc *sumVM, v sumVM) {
			acc.Events += v.Events
			acc.Kinds.Relevant += v.Kinds.Relevant
			acc.Kinds.Irrelevant += v.Kinds.Irrelevant
			acc.Kinds.Partial += v.Kinds.Partial
			acc.Kinds.Duplicate += v.Kinds.Duplicate
			acc.Kinds.Untracked += v.Kinds.Untracked
			acc.Rejected += v.Rejected
			acc.Callbacks += v.Callbacks
			acc.OverBudget += v.OverBudget
			acc.P50Ns, acc.P99Ns = max(acc.P50Ns, v.P50Ns), max(acc.P99Ns, v.P99Ns)
			acc.PeakTables += v.PeakTables
			acc.Refused += v.Refused
		}
		for _, v := range vms {
			row(tw, fmt.Sprint(v.ID), v, time.Duration(v.P50Ns), time.Duration(v.P99Ns))
			add(&tot, v)
		}
		if len(rest) > 0 {
			var oth sumVM
			for _, v := range rest {
				add(&oth, v)
				add(&tot, v)
			}
			row(tw, fmt.Sprintf("others (%d VMs)", len(rest)), oth, -1, -1)
		}
		tot.PeakTables = sum.Tables.Peak
		row(tw, "total", tot, time.Duration(sum.Latency.P50), time.Duration(sum.Latency.P99))
		tw.Flush()
		ev := sum.Events
		fmt.Fprintf(ew, "\n%s events in %.1fs: %s events/s; submitted %d = processed %d + rejected %d", si(float64(ev.Processed)), sum.ran.Seconds(),
			si(ev.PerSecond), ev.Submitted, ev.Processed, ev.Rejected)
		if ev.Unprocessed > 0 {
			fmt.Fprintf(ew, " + unprocessed %d (the drain was cut short)", ev.Unprocessed)
		}
		fmt.Fprintln(ew)
		l := sum.Latency
		fmt.Fprintf(ew, "trap-to-callback latency: p50 %v  p99 %v  p99.9 %v  max %v; budget %v, violated by %d of %d callbacks (%.3f%%)\n",
			time.Duration(l.P50), time.Duration(l.P99), time.Duration(l.P999), time.Duration(l.Max), time.Duration(l.Budget),
			sum.OverBudget, sum.Callbacks, pct(sum.OverBudget, sum.Callbacks))
		if y := sum.Sync; y != nil {
			fmt.Fprintf(ew, "synchronous writes: %d, stall (trap to the vCPU's release) p50 %v  p99 %v  p99.9 %v  max %v; verdicts: %d allow, %d deny\n",
				y.Writes, time.Duration(y.P50Ns), time.Duration(y.P99Ns), time.Duration(y.P999Ns), time.Duration(y.MaxNs), y.Allowed, y.Denied)
		}
		t := sum.Tables
		fmt.Fprintf(ew, "tables: peak %d hooked, %s of host memory, %d bytes per table; %d hooks, %d unhooks (%.3f per event); %d shards, %d callback panics\n",
			t.Peak, bytesStr(t.PeakHostBytes), t.BytesPerTable, t.Hooks, t.Unhooks,
			float64(t.Hooks+t.Unhooks)/float64(max(1, ev.Processed)), sum.Config.Shards, sum.Panics)
		if w := sum.Workers; len(w.CPUs) > 0 {
			fmt.Fprintf(ew, "workers: %s; %d steps run by other threads (idle peers, synchronous submitters), %v polling idle queues\n",
				pinStr(w.CPUs), w.Steals, time.Duration(w.SpinNs).Round(time.Microsecond))
		}
		if g := sum.Guest; g != (sumGuest{}) {
			fmt.Fprintf(ew, "guest memory ahead of the queues: %d writes dropped (a later read of their page held them), %d tables no longer linked when read (not reported), %d pages read again (a value no longer in memory), %d partial writes ended by their timeout\n",
				g.StaleWrites, g.StaleReads, g.Resyncs, g.ExpiredPartial)
		}
		sum.writeLimits(ew, top)
		for _, l := range sum.backendLines {
			fmt.Fprintln(ew, l)
		}
	}
	fmt.Fprintln(ew, sum.endedLine())
	return ew.err
}

// endedLine says how the run ended.
func (sum *summary) endedLine() string {
	en := sum.Ended
	el := time.Duration(en.ElapsedNs).Round(10 * time.Millisecond)
	var b strings.Builder
	switch en.Cause {
	case "backend":
		fmt.Fprintf(&b, "ended: the %s backend finished after %v", sum.Config.Backend, el)
	case "signal":
		fmt.Fprintf(&b, "ended: interrupted by %s after %v", en.Signal, el)
	case "duration":
		fmt.Fprintf(&b, "ended: interrupted at the end of -duration %v", time.Duration(sum.Config.DurationNs))
	default:
		fmt.Fprintf(&b, "ended: interrupted by a %s after %v", en.Reason, el)
	}
	if en.Interrupted {
		fmt.Fprintf(&b, "; stopped in %v", time.Duration(en.StopNs).Round(time.Millisecond))
	}
	if en.BackendAborted {
		fmt.Fprintf(&b, "; the backend did not stop within %v, so the engine was closed under it (roots it had not stopped were not reported removed)", graceBackend)
	}
	for _, a := range en.Abandoned {
		switch a {
		case "run":
			fmt.Fprintf(&b, "; ABANDONED while %s", en.Phase)
		case "backend":
			b.WriteString("; the backend had not returned")
		case "drain":
			b.WriteString("; the engine had not drained its queues")
		case "trace":
			b.WriteString("; the trace was not finished (nothing written under its name; the partial data stays in its temporary file)")
		}
	}
	if en.Complete {
		b.WriteString("; complete")
	}
	return b.String()
}

func row(tw io.Writer, name string, v sumVM, p50, p99 time.Duration) {
	k := v.Kinds
	lat := func(d time.Duration) string {
		if d < 0 {
			return "-"
		}
		return d.String()
	}
	fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t%.1f%%\t%d\t%d\t\n", name, v.Events,
		k.Relevant, k.Irrelevant, k.Partial, k.Duplicate, k.Untracked, v.Rejected, v.Callbacks, lat(p50), lat(p99),
		pct(v.OverBudget, v.Callbacks), v.PeakTables, v.Refused)
}

func pct(a, b uint64) float64 {
	if b == 0 {
		return 0
	}
	return 100 * float64(a) / float64(b)
}

// pinStr says where the shard workers run: "2 unpinned" or "pinned to CPUs 0,1".
func pinStr(cpus []int) string {
	var pinned []string
	for _, c := range cpus {
		if c >= 0 {
			pinned = append(pinned, strconv.Itoa(c))
		}
	}
	switch {
	case len(pinned) == 0:
		return fmt.Sprintf("%d unpinned (the scheduler places them)", len(cpus))
	case len(pinned) == len(cpus):
		return "pinned to CPUs " + strings.Join(pinned, ",")
	}
	return fmt.Sprintf("%d pinned (CPUs %s), %d unpinned", len(pinned), strings.Join(pinned, ","), len(cpus)-len(pinned))
}
