package main

import (
	"bytes"
	"fmt"
	"math"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/vasengine/vasengine/engine"
)

// vmCollector exports per-VM latency, callbacks and table counts next to
// the engine's own per-VM series, with the same label cap: a VM in one of
// the engine's first Config.MaxVMLabels counter slots (VMStats.Slot) gets
// its own vm label, the others are summed as vm="other", as the engine
// does for vasengine_vm_events_submitted_total.
type vmCollector struct {
	e *engine.Engine
}

func newVMCollector(e *engine.Engine) *vmCollector { return &vmCollector{e: e} }

var (
	dVMLatency = prometheus.NewDesc("vasengine_vm_callback_latency_seconds",
		"Trap-to-callback latency per VM (power-of-two buckets; the sum is an upper bound: each callback counted at its bucket's bound).", []string{"vm"}, nil)
	dVMCallbacks = prometheus.NewDesc("vasengine_vm_callbacks_total", "Callbacks invoked per VM.", []string{"vm"}, nil)
	dVMOver      = prometheus.NewDesc("vasengine_vm_latency_budget_violations_total", "Callbacks per VM invoked later than the latency budget after their trap.", []string{"vm"}, nil)
	dVMTables    = prometheus.NewDesc("vasengine_vm_hooked_tables", "Page tables hooked per VM.", []string{"vm"}, nil)
	dVMRefused   = prometheus.NewDesc("vasengine_vm_hook_refusals", "Table hooks refused by a VM's or its roots' budgets.", []string{"vm"}, nil)
	dVMRoots     = prometheus.NewDesc("vasengine_vm_roots", "Address spaces monitored per VM.", []string{"vm"}, nil)
)

// vmBucketsFrom..vmBucketsTo are the exported buckets of the per-VM
// histograms: 2^10 ns (about 1 us) to 2^30 ns (about 1.07 s).
const vmBucketsFrom, vmBucketsTo = 10, 30

func (c *vmCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{dVMLatency, dVMCallbacks, dVMOver, dVMTables, dVMRefused, dVMRoots} {
		ch <- d
	}
}

func (c *vmCollector) Collect(ch chan<- prometheus.Metric) {
	labels := c.e.Config().MaxVMLabels
	type acc struct {
		lat                    [64]uint64
		callbacks, over        uint64
		tables, refused, roots int64
	}
	byLabel := map[string]*acc{}
	var order []string
	for _, v := range c.e.Stats().PerVM {
		id := "other" // the engine sums there the VMs of slots reused too
		if v.Slot < labels {
			id = strconv.FormatUint(uint64(v.ID), 10)
		}
		a := byLabel[id]
		if a == nil {
			a = &acc{}
			byLabel[id] = a
			order = append(order, id)
		}
		for b, n := range v.Latency {
			a.lat[b] += n
		}
		a.callbacks += v.Callbacks
		a.over += v.OverBudget
		if !v.Removed {
			a.tables += v.Tables
			a.refused += v.Refused
			a.roots += v.Roots
		}
	}
	for _, id := range order {
		a := byLabel[id]
		buckets := map[float64]uint64{}
		var cum, count uint64
		var sum float64
		for b, n := range a.lat {
			count += n
			sum += float64(n) * math.Ldexp(1, b) / 1e9
			cum += n
			if b >= vmBucketsFrom && b <= vmBucketsTo {
				buckets[math.Ldexp(1, b)/1e9] = cum
			}
		}
		ch <- prometheus.MustNewConstHistogram(dVMLatency, count, sum, buckets, id)
		ch <- prometheus.MustNewConstMetric(dVMCallbacks, prometheus.CounterValue, float64(a.callbacks), id)
		ch <- prometheus.MustNewConstMetric(dVMOver, prometheus.CounterValue, float64(a.over), id)
		ch <- prometheus.MustNewConstMetric(dVMTables, prometheus.GaugeValue, float64(a.tables), id)
		ch <- prometheus.MustNewConstMetric(dVMRefused, prometheus.GaugeValue, float64(a.refused), id)
		ch <- prometheus.MustNewConstMetric(dVMRoots, prometheus.GaugeValue, float64(a.roots), id)
	}
}

// metricsSnap keeps the exposition for -metrics-out: the last one gathered
// while the engine had VMs registered. A backend removes its VMs as it
// ends, and the engine then counts them under vm="other" with
// vasengine_vms 0, which no plan can use; so the file holds the state of
// the last sample (every 250 ms, and at the stop request) before that.
// Every sample carries the time it was gathered (plan -prom reads it as
// the scrape time).
type metricsSnap struct {
	mu   sync.Mutex
	data []byte
	err  error
}

// sample gathers reg now; unless force, only while e has VMs registered.
func (m *metricsSnap) sample(reg *prometheus.Registry, e *engine.Engine, force bool) {
	if !force && e.Stats().VMs == 0 {
		return
	}
	data, err := exposition(reg, time.Now())
	m.mu.Lock()
	m.data, m.err = data, err
	m.mu.Unlock()
}

func (m *metricsSnap) taken() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.data != nil || m.err != nil
}

// write writes the snapshot to path (-metrics-out).
func (m *metricsSnap) write(path string) error {
	m.mu.Lock()
	data, err := m.data, m.err
	m.mu.Unlock()
	if err != nil {
		return fmt.Errorf("-metrics-out: %w", err)
	}
	return writeOutput("-metrics-out", path, data)
}

// exposition is reg's text exposition, every sample stamped with at.
func exposition(reg *prometheus.Registry, at time.Time) ([]byte, error) {
	mfs, err := reg.Gather()
	if err != nil {
		return nil, err
	}
	ms := at.UnixMilli()
	var buf bytes.Buffer
	enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		for _, m := range mf.Metric {
			m.TimestampMs = &ms
		}
		if err := enc.Encode(mf); err != nil {
			return nil, err
		}
	}
	return buf.Bytes(), nil
}
