package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/plan"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vmlimit"
)

// Per-VM limits (issue 19): -vm-max-rate holds each VM to an events/s limit
// (package vmlimit, in front of the engine: the engine has no rate limit of
// its own); -vm-share gives each VM at least that many events of every
// shard queue before another VM's flood can hold it back. The engine's fair
// ingest gives each VM QueueDepth/(2 x VMs registered) events of a shard's
// queue (a VM past its share waits, or is refused with -nonblocking, once
// the queue is half full; one within it never is), and has no setting for
// the share itself, so -vm-share sizes the queues: -queue-depth is raised
// to 2 x VMs x -vm-share when below. It needs the backend's VM count
// (sim and kvm -vms, qemu -guests): a replay's VMs are known only once its
// trace is read.

// vmLimitFlags are -vm-max-rate, -vm-max-burst and -vm-share.
type vmLimitFlags struct {
	maxRate  float64
	burst    int
	share    int
	queueSet bool // -queue-depth was given
	flood    string
}

// maxVMShare bounds -vm-share: the queue depth it implies for one VM.
const maxVMShare = 1 << 23

func (f *vmLimitFlags) register(fs *flag.FlagSet) {
	fs.Float64Var(&f.maxRate, "vm-max-rate", 0, "events/s each VM may submit; a VM over it is throttled: held (or, with -nonblocking, its excess refused) and counted (0: no limit)")
	fs.IntVar(&f.burst, "vm-max-burst", 0, "events a VM may submit at once above -vm-max-rate (default: 100 ms of the rate, at least 256)")
	fs.IntVar(&f.share, "vm-share", 0, "events of each shard queue every VM is guaranteed before another VM's flood holds it back; raises -queue-depth to 2 x VMs x N (0: the engine's share of -queue-depth)")
	fs.StringVar(&f.flood, "flood", "", "write-flood policy: a level-1 page-table page written more than WRITES times within WINDOW is read now and then instead of trapped; WRITES/WINDOW (e.g. 20000/10ms, the default) or off")
	if q := fs.Lookup("queue-depth"); q != nil {
		q.Value = &setValue{Value: q.Value, set: &f.queueSet}
	}
}

// setValue records that its flag was given.
type setValue struct {
	flag.Value
	set *bool
}

func (v *setValue) Set(s string) error { *v.set = true; return v.Value.Set(s) }

// check validates the flags; vms is the backend's VM count (0: unknown).
func (f *vmLimitFlags) check(vms int) error {
	if !(f.maxRate >= 0) || !finite(f.maxRate) {
		return usagef("-vm-max-rate %v: must be a finite number of events/s, not negative (0: no limit)", f.maxRate)
	}
	if f.burst < 0 {
		return usagef("-vm-max-burst %d: must not be negative", f.burst)
	}
	if f.burst > 0 && f.maxRate == 0 {
		return usagef("-vm-max-burst %d: needs -vm-max-rate", f.burst)
	}
	if f.share < 0 || f.share > maxVMShare {
		return usagef("-vm-share %d: must be within 0..%d events", f.share, maxVMShare)
	}
	if f.share > 0 && vms == 0 {
		return usagef("-vm-share needs the number of VMs before the run (sim and kvm -vms, qemu -guests); with replay, size -queue-depth instead (each VM gets queue-depth / (2 x VMs))")
	}
	return nil
}

// apply checks the flags and sets the queue depth -vm-share needs;
// depthSet says -queue-depth was given.
func (f *vmLimitFlags) apply(cfg *engine.Config, vms int, depthSet bool) error {
	if err := f.check(vms); err != nil {
		return err
	}
	pol, err := parseFlood(f.flood)
	if err != nil {
		return err
	}
	cfg.Flood = pol
	if f.share == 0 {
		return nil
	}
	need := 2 * vms * f.share
	if cfg.QueueDepth >= need {
		return nil
	}
	if depthSet {
		return usagef("-vm-share %d with %d VMs needs -queue-depth of at least %d (2 x VMs x share), not %d", f.share, vms, need, cfg.QueueDepth)
	}
	if need > 1<<24 {
		return usagef("-vm-share %d with %d VMs needs a queue depth of %d: more than 16777216", f.share, vms, need)
	}
	if err := checkMemory(fmt.Sprintf("-vm-share %d x %d VMs (queue depth %d x %d shards)", f.share, vms, need, cfg.Shards), queueBytes(cfg.Shards, need)); err != nil {
		return err
	}
	cfg.QueueDepth = need
	return nil
}

// backendVMs is the number of VMs a backend runs at once, 0 if unknown
// before it runs.
func backendVMs(b backend) int {
	switch b := b.(type) {
	case *simBackend:
		return b.cfg.VMs
	case *kvmBackend:
		return b.cfg.VMs
	case *qemuBackend:
		return b.cfg.Guests
	}
	return 0
}

// applyLimits validates the session's per-VM limits and sizes its queues,
// before anything runs.
func (s *session) applyLimits() error {
	if s.flags == nil {
		return nil
	}
	if sb, ok := s.b.(*simBackend); ok {
		sb.limit = s.flags.limits.maxRate
	}
	return s.flags.limits.apply(&s.cfg, backendVMs(s.b), s.flags.limits.queueSet)
}

// limitHost wraps host in the per-VM rate limit, if any; its waits end
// when ctx does (the run is stopping).
func (s *session) limitHost(ctx context.Context, host engine.Host) engine.Host {
	f := s.flags.limits
	if f.maxRate == 0 {
		return host
	}
	lim, err := vmlimit.New(host, vmlimit.Config{Rate: f.maxRate, Burst: f.burst, NonBlocking: s.cfg.NonBlocking, Done: ctx.Done()})
	if err != nil { // (checked by applyLimits)
		panic(err)
	}
	s.mu.Lock()
	s.lim = lim
	e := s.e
	s.mu.Unlock()
	if e != nil {
		s.reg.MustRegister(&limitCollector{e: e, lim: lim})
	}
	return lim
}

// sumLimits is the JSON summary's "limits": the per-VM limits in force and
// what the write-flood policy did.
type sumLimits struct {
	VMMaxRate   float64 `json:"vm_max_rate"` // events/s; 0: none
	VMBurst     int     `json:"vm_burst"`
	VMShare     int     `json:"vm_share"` // events per shard queue asked by -vm-share; 0: not asked
	QueueShare  int     `json:"queue_share"`
	Throttled   uint64  `json:"throttled"`
	Floods      uint64  `json:"flooded_pages_total"`
	FloodPolls  uint64  `json:"flood_polls"`
	FloodedPeak int64   `json:"flooded_pages_peak"`
}

// summarizeLimits fills the summary's limits and per-VM throttling and
// flooding (the peaks sampled while the VMs were registered).
func (s *session) summarizeLimits(sum *summary, st engine.Stats, prog *progress) {
	f := s.flags.limits
	l := &sum.Limits
	l.VMMaxRate, l.VMShare = f.maxRate, f.share
	n := 0
	for _, v := range sum.VMs {
		if !v.Removed {
			n++
		}
	}
	l.QueueShare = s.cfg.QueueDepth / (2 * max(1, backendVMs(s.b), n))
	l.Floods, l.FloodPolls = st.Floods, st.Polls
	s.mu.Lock()
	lim := s.lim
	s.mu.Unlock()
	thr := map[vasmon.VMID]vmlimit.VMStats{}
	if lim != nil {
		l.VMBurst = lim.Config().Burst
		for _, v := range lim.Stats() {
			thr[v.VM] = v
			l.Throttled += v.Throttled()
		}
	}
	var peaks map[vasmon.VMID]int64
	if prog != nil {
		peaks = prog.floodPeaks()
	}
	for i := range sum.VMs {
		v := &sum.VMs[i]
		t := thr[vasmon.VMID(v.ID)]
		v.Throttled, v.ThrottleWaitNs = t.Throttled(), int64(t.Wait)
		v.FloodedPeak = peaks[vasmon.VMID(v.ID)]
		l.FloodedPeak += v.FloodedPeak
	}
}

// writeLimits prints the limits and the VMs throttled or flooded (at most
// top, the most throttled first; 0: all), when there is any.
func (sum *summary) writeLimits(w io.Writer, top int) {
	l := sum.Limits
	var vms []sumVM
	for _, v := range sum.VMs {
		if v.Throttled > 0 || v.FloodedPeak > 0 {
			vms = append(vms, v)
		}
	}
	if l.VMMaxRate == 0 && l.VMShare == 0 && l.Floods == 0 && len(vms) == 0 {
		return
	}
	rate := "none"
	if l.VMMaxRate > 0 {
		rate = fmt.Sprintf("%s events/s (burst %d)", si(l.VMMaxRate), l.VMBurst)
	}
	fmt.Fprintf(w, "per-VM limits: rate %s; queue share %d events per shard (fair ingest)", rate, l.QueueShare)
	if l.VMShare > 0 {
		fmt.Fprintf(w, ", -vm-share %d", l.VMShare)
	}
	fmt.Fprintf(w, "; %d events throttled; write floods: %d pages flooded (read instead of trapped), %d reads of them\n", l.Throttled, l.Floods, l.FloodPolls)
	if len(vms) == 0 {
		return
	}
	sort.SliceStable(vms, func(i, j int) bool {
		if vms[i].Throttled != vms[j].Throttled {
			return vms[i].Throttled > vms[j].Throttled
		}
		return vms[i].FloodedPeak > vms[j].FloodedPeak
	})
	if top > 0 && len(vms) > top {
		vms = vms[:top]
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "vm\tsubmitted\tthrottled\theld\tflooded pages (peak)\t")
	for _, v := range vms {
		fmt.Fprintf(tw, "%d\t%d\t%d\t%v\t%d\t\n", v.ID, v.Submitted, v.Throttled, time.Duration(v.ThrottleWaitNs).Round(time.Millisecond), v.FloodedPeak)
	}
	tw.Flush()
}

// floodPeaks returns the most pages each VM had flooded at once.
func (p *progress) floodPeaks() map[vasmon.VMID]int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := make(map[vasmon.VMID]int64, len(p.peakFlood))
	for k, v := range p.peakFlood {
		m[k] = v
	}
	return m
}

// parseFlood parses -flood: "" (the engine's default), "off", or
// WRITES/WINDOW.
func parseFlood(s string) (vasmon.FloodPolicy, error) {
	switch s {
	case "":
		return vasmon.FloodPolicy{}, nil
	case "off":
		return vasmon.FloodPolicy{Writes: -1}, nil
	}
	ws, win, ok := strings.Cut(s, "/")
	n, err1 := strconv.Atoi(ws)
	d, err2 := time.ParseDuration(win)
	if !ok || err1 != nil || err2 != nil || n < 1 || d <= 0 {
		return vasmon.FloodPolicy{}, usagef("-flood %q: want WRITES/WINDOW (e.g. 20000/10ms: a positive count and duration) or off", s)
	}
	return vasmon.FloodPolicy{Writes: n, Window: int64(d)}, nil
}

// planLimits are the limits plan takes (-vm-max-rate, -vm-max-burst,
// -vm-share: how many VMs fit when each is held to them).
func (f *vmLimitFlags) planLimits() (plan.Limits, error) {
	if err := f.check(1); err != nil {
		return plan.Limits{}, err
	}
	l := plan.Limits{MaxRate: f.maxRate, Share: f.share}
	if f.maxRate > 0 {
		l.MaxBurst = float64(f.burst)
		if f.burst == 0 {
			l.MaxBurst = float64(vmlimit.DefaultBurst(f.maxRate))
		}
	}
	return l, nil
}

// limitCollector exports the per-VM rate limit's counts, with the engine's
// label cap: a VM whose counter slot is among the engine's first
// Config.MaxVMLabels has its own vm label, the others (and VMs no longer
// registered) are summed as vm="other".
type limitCollector struct {
	e   *engine.Engine
	lim *vmlimit.Host
}

var (
	dVMThrottled = prometheus.NewDesc("vasengine_vm_throttled_events_total",
		"Events of a VM held or refused by its events/s limit (-vm-max-rate).", []string{"vm"}, nil)
	dVMThrottleWait = prometheus.NewDesc("vasengine_vm_throttle_wait_seconds_total",
		"Time a VM's submitters were held by its events/s limit (-vm-max-rate).", []string{"vm"}, nil)
)

func (c *limitCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- dVMThrottled
	ch <- dVMThrottleWait
}

func (c *limitCollector) Collect(ch chan<- prometheus.Metric) {
	labels := c.e.Config().MaxVMLabels
	own := map[vasmon.VMID]bool{}
	for _, v := range c.e.Stats().PerVM {
		if v.Slot < labels && !v.Removed {
			own[v.ID] = true
		}
	}
	type acc struct {
		n    uint64
		wait time.Duration
	}
	by := map[string]*acc{}
	var order []string
	for _, v := range c.lim.Stats() {
		id := "other"
		if own[v.VM] {
			id = strconv.FormatUint(uint64(v.VM), 10)
		}
		a := by[id]
		if a == nil {
			a = &acc{}
			by[id] = a
			order = append(order, id)
		}
		a.n += v.Throttled()
		a.wait += v.Wait
	}
	for _, id := range order {
		a := by[id]
		ch <- prometheus.MustNewConstMetric(dVMThrottled, prometheus.CounterValue, float64(a.n), id)
		ch <- prometheus.MustNewConstMetric(dVMThrottleWait, prometheus.CounterValue, a.wait.Seconds(), id)
	}
}
