package engine

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// LatencyBuckets are the upper bounds, in seconds, of the exported
// trap-to-callback latency histogram.
var LatencyBuckets = []float64{1e-6, 2.5e-6, 5e-6, 10e-6, 20e-6, 50e-6, 100e-6, 250e-6, 500e-6,
	1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1}

// Register exports the engine's metrics on reg. Everything is read from the
// engine's counters when reg is scraped, so metrics cost the event path
// nothing. Per-VM series carry a "vm" label only for the VMs in the first
// Config.MaxVMLabels counter slots (slots are handed out in AddVM order and
// reused after RemoveVM); the others are summed under vm="other", so the
// number of series is bounded whatever the number of VMs.
func (e *Engine) Register(reg prometheus.Registerer) error {
	return reg.Register(&collector{e: e, bounds: shard.BoundsNs(LatencyBuckets)})
}

type collector struct {
	e      *Engine
	bounds []int64
}

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("vasengine_"+name, help, labels, nil)
}

var (
	dSubmitted  = desc("events_submitted_total", "Events passed to Submit.")
	dRejected   = desc("events_rejected_total", "Events Submit returned as errors (overload, closed, unknown VM).")
	dEvents     = desc("events_total", "Events processed, by kind (relevant, irrelevant, partial, duplicate, untracked).", "kind")
	dVMEvents   = desc("vm_events_total", "Events processed per VM and kind; VMs past the label limit are summed as vm=\"other\".", "vm", "kind")
	dVMSubmit   = desc("vm_events_submitted_total", "Events submitted per VM; VMs past the label limit are summed as vm=\"other\".", "vm")
	dCallbacks  = desc("callbacks_total", "Callbacks invoked.")
	dLatency    = desc("callback_latency_seconds", "Trap-to-callback latency.")
	dBudget     = desc("latency_budget_seconds", "The configured trap-to-callback latency budget.")
	dOver       = desc("latency_budget_violations_total", "Callbacks invoked later than the latency budget after their trap.")
	dPanics     = desc("callback_panics_total", "Callback panics recovered.")
	dQueue      = desc("queue_depth", "Events queued in a shard's ingest queue.", "shard")
	dQueueCap   = desc("queue_capacity", "Capacity of a shard's ingest queue.", "shard")
	dBatches    = desc("batches_total", "Batches drained by a shard worker.", "shard")
	dBatchEv    = desc("batch_events_total", "Events drained in batches by a shard worker (mean batch size = rate of this / rate of batches_total).", "shard")
	dTables     = desc("hooked_tables", "Page tables hooked.")
	dBytes      = desc("table_host_bytes", "Host memory held for hooked tables (shadows, nodes, indexes).")
	dRefused    = desc("hook_refusals_total", "Table hooks refused by a root or VM table budget.")
	dMessages   = desc("structural_messages_total", "Hook and unhook requests executed on another shard than the one that made them.")
	dHeld       = desc("held_requests", "Hook requests held back behind in-flight unhooks of the same root.")
	dPartial    = desc("partial_writes", "Entry writes in progress (partially written entries).")
	dExpired    = desc("partial_writes_expired_total", "Partial writes ended with the bytes they had after the pending timeout (trap times).")
	dStale      = desc("stale_writes_total", "Page-table writes dropped because a later read of their page already held them (version stamps).")
	dStaleReads = desc("stale_reads_total", "Tables guest memory no longer linked at their place when read: hooks dropped and tables unhooked early, nothing reported from them (no phantoms).")
	dResyncs    = desc("page_resyncs_total", "Pages read again because a written value could no longer be proven in guest memory.")
	dProofs     = desc("value_proofs_total", "Written values proven true before they were reported, by how: the store's stamp (stamp) or a read of guest memory (memory).", "how")
	dStall      = desc("sync_stall_seconds", "Stall of synchronous writes (Syncer.Submit): from the trap to the release of the writer.")
	dVerdicts   = desc("sync_verdicts_total", "Synchronous writes by the verdict of their callbacks (allow, deny).", "verdict")
	dSpin       = desc("worker_spin_seconds_total", "Time shard workers spent polling their idle queues.")
	dShardCPU   = desc("shard_cpu", "The host CPU a shard's worker is pinned to; -1: unpinned.", "shard")
	dFlooded    = desc("vm_flooded_pages", "Page-table pages a VM writes so often that they are read now and then instead of trapped; VMs past the label limit are summed as vm=\"other\".", "vm")
	dFloods     = desc("flooded_pages_total", "Pages found flooded (written faster than the flood threshold).")
	dSteals     = desc("shard_steals_total", "Shard steps run by another thread than the shard's worker (an idle peer or a synchronous submitter).")
	dHooks      = desc("table_hooks_total", "Page tables hooked (hook steps that hooked a table).")
	dUnhooks    = desc("table_unhooks_total", "Page tables unhooked.")
	dRoots      = desc("roots", "Address spaces monitored.")
	dVMs        = desc("vms", "VMs registered.")
	dShards     = desc("shards", "Shards (worker goroutines).")
	dAllDescs   = []*prometheus.Desc{dSubmitted, dRejected, dEvents, dVMEvents, dVMSubmit, dCallbacks, dLatency, dBudget, dOver, dPanics, dQueue, dQueueCap, dBatches, dBatchEv, dTables, dBytes, dRefused, dMessages, dHeld, dPartial, dExpired, dStale, dHooks, dUnhooks, dRoots, dVMs, dShards, dStaleReads, dResyncs, dProofs, dSteals, dStall, dVerdicts, dSpin, dShardCPU, dFlooded, dFloods}
	counterType = prometheus.CounterValue
	gaugeType   = prometheus.GaugeValue
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range dAllDescs {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	e := c.e
	st := e.Stats()
	m := func(d *prometheus.Desc, t prometheus.ValueType, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, t, v, l...)
	}
	m(dSubmitted, counterType, float64(st.Submitted))
	m(dRejected, counterType, float64(st.Rejected))
	for k, n := range st.Kinds {
		m(dEvents, counterType, float64(n), vasmon.WriteKind(k).String())
	}
	// Per-VM series, bounded: a VM in one of the first MaxVMLabels slots
	// has its own (until its slot is reused); the others, and those whose
	// slot was reused, are summed as "other".
	e.slotMu.Lock()
	other := VMStats{Submitted: e.gone.submitted, Kinds: e.gone.kinds}
	e.slotMu.Unlock()
	for _, v := range st.PerVM {
		if v.Slot < e.cfg.MaxVMLabels {
			id := strconv.FormatUint(uint64(v.ID), 10)
			for k, n := range v.Kinds {
				m(dVMEvents, counterType, float64(n), id, vasmon.WriteKind(k).String())
			}
			m(dVMSubmit, counterType, float64(v.Submitted), id)
			m(dFlooded, gaugeType, float64(v.Flooded), id)
			continue
		}
		other.Flooded += v.Flooded
		other.Submitted += v.Submitted
		for k := range v.Kinds {
			other.Kinds[k] += v.Kinds[k]
		}
	}
	if len(st.PerVM) > e.cfg.MaxVMLabels || other.Submitted > 0 {
		for k, n := range other.Kinds {
			m(dVMEvents, counterType, float64(n), "other", vasmon.WriteKind(k).String())
		}
		m(dVMSubmit, counterType, float64(other.Submitted), "other")
		m(dFlooded, gaugeType, float64(other.Flooded), "other")
	}
	m(dFloods, counterType, float64(st.Floods))
	m(dCallbacks, counterType, float64(st.Callbacks))
	cum := make([]uint64, len(c.bounds))
	st.Latency.Cumulative(c.bounds, cum)
	buckets := make(map[float64]uint64, len(cum))
	for i, b := range LatencyBuckets {
		buckets[b] = cum[i]
	}
	ch <- prometheus.MustNewConstHistogram(dLatency, st.Latency.Count(), float64(st.Latency.Sum())/1e9, buckets)
	m(dBudget, gaugeType, e.cfg.Budget.Seconds())
	m(dOver, counterType, float64(st.OverBudget))
	m(dPanics, counterType, float64(st.Panics))
	for _, s := range e.shards {
		id := strconv.Itoa(s.ID())
		m(dQueue, gaugeType, float64(s.QueueLen()), id)
		m(dQueueCap, gaugeType, float64(s.QueueCap()), id)
		m(dBatches, counterType, float64(s.C.Batches.Load()), id)
		m(dBatchEv, counterType, float64(s.C.BatchSum.Load()), id)
	}
	m(dTables, gaugeType, float64(st.Tables))
	m(dBytes, gaugeType, float64(st.HostBytes))
	m(dRefused, counterType, float64(st.Refused+e.refusedGone.Load()))
	m(dMessages, counterType, float64(st.Messages))
	var held, partial int64
	for _, s := range e.shards {
		held += s.C.Held.Load()
		partial += s.C.Partial.Load()
	}
	m(dHeld, gaugeType, float64(held))
	m(dPartial, gaugeType, float64(partial))
	m(dExpired, counterType, float64(st.Expired))
	m(dStale, counterType, float64(st.StaleWrites))
	m(dStaleReads, counterType, float64(st.StaleReads))
	m(dResyncs, counterType, float64(st.Resyncs))
	m(dSteals, counterType, float64(st.Steals))
	// A map of its own: the latency histogram sent above keeps its map
	// (the registry may write it out after Collect went on).
	st.SyncStall.Cumulative(c.bounds, cum)
	stall := make(map[float64]uint64, len(cum))
	for i, b := range LatencyBuckets {
		stall[b] = cum[i]
	}
	ch <- prometheus.MustNewConstHistogram(dStall, st.SyncStall.Count(), float64(st.SyncStall.Sum())/1e9, stall)
	m(dProofs, counterType, float64(st.StampProofs), "stamp")
	m(dProofs, counterType, float64(st.Proofs), "memory")
	m(dVerdicts, counterType, float64(st.Allowed), "allow")
	m(dVerdicts, counterType, float64(st.Denied), "deny")
	m(dSpin, counterType, st.Spin.Seconds())
	for _, s := range e.shards {
		m(dShardCPU, gaugeType, float64(s.CPU()), strconv.Itoa(s.ID()))
	}
	m(dHooks, counterType, float64(st.Hooks))
	m(dUnhooks, counterType, float64(st.Unhooks))
	m(dRoots, gaugeType, float64(st.Roots))
	m(dVMs, gaugeType, float64(st.VMs))
	m(dShards, gaugeType, float64(len(e.shards)))
}
