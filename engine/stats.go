package engine

import (
	"sort"
	"time"

	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// Stats is a snapshot of the engine's counters.
type Stats struct {
	Submitted, Accepted, Rejected, Processed uint64
	Kinds                                    [5]uint64 // by vasmon.WriteKind
	Callbacks, OverBudget, Panics            uint64
	Batches, BatchEvents                     uint64
	Messages                                 uint64 // structural messages between shards
	Hooks, Unhooks                           uint64 // tables hooked and unhooked since New
	QueueLen                                 int
	Tables, HostBytes                        int64
	Refused                                  int64 // table hooks refused by budgets (current VMs)
	Roots, VMs                               int
	Latency                                  shard.HistSnapshot
	PerVM                                    []VMStats
}

// VMStats are one VM's counters.
type VMStats struct {
	ID                  vasmon.VMID
	Removed             bool // RemoveVM was called; counters kept until the slot is reused
	Submitted, Rejected uint64
	Kinds               [5]uint64
	Callbacks           uint64
	OverBudget          uint64                         // callbacks later than the latency budget
	Latency             [shard.VMLatencyBuckets]uint64 // see shard.VMLatencyBuckets
	Tables, Refused     int64
	Roots               int64
}

// Events returns the processed events of s (sum of kinds).
func (v *VMStats) Events() uint64 {
	var n uint64
	for _, k := range v.Kinds {
		n += k
	}
	return n
}

// LatencyQuantile returns an upper bound of the q-quantile of the VM's
// trap-to-callback latencies, within a factor of two (0 if none).
func (v *VMStats) LatencyQuantile(q float64) time.Duration {
	var n uint64
	for _, c := range v.Latency {
		n += c
	}
	if n == 0 {
		return 0
	}
	rank := uint64(q*float64(n-1)) + 1
	var seen uint64
	b := 0
	for ; b < len(v.Latency)-1; b++ {
		if seen += v.Latency[b]; seen >= rank {
			break
		}
	}
	return time.Duration(min(uint64(1)<<b, 1<<62))
}

// Stats returns a snapshot. Counters are read one by one while workers run,
// so the snapshot is exact only when the engine is quiescent (after Sync).
func (e *Engine) Stats() Stats {
	var st Stats
	st.Submitted = e.submitted.Load()
	st.Accepted = e.accepted.Load()
	st.Rejected = e.rejected.Load()
	var h shard.HistSnapshot
	for _, s := range e.shards {
		c := &s.C
		st.Processed += c.Processed.Load()
		for i := range st.Kinds {
			st.Kinds[i] += c.Kinds[i].Load()
		}
		st.Callbacks += c.Callbacks.Load()
		st.OverBudget += c.OverBudget.Load()
		st.Panics += c.Panics.Load()
		st.Batches += c.Batches.Load()
		st.BatchEvents += c.BatchSum.Load()
		st.Messages += c.MsgsIn.Load()
		st.Hooks += c.Hooks.Load()
		st.Unhooks += c.Unhooks.Load()
		st.QueueLen += s.QueueLen()
		st.Tables += s.Tables()
		st.HostBytes += s.HostBytes()
		s.Hist.Snapshot(&h)
		st.Latency.Merge(&h)
	}
	e.roots.Range(func(rootKey, *vasmon.Root) bool { st.Roots++; return true })
	e.slotMu.Lock()
	owners := make([]*vmEntry, 0, len(e.owner))
	removed := make([]bool, 0, len(e.owner))
	for _, ve := range e.owner {
		if ve != nil {
			owners = append(owners, ve)
			removed = append(removed, ve.removed)
		}
	}
	e.slotMu.Unlock()
	for i, ve := range owners {
		if !removed[i] {
			st.VMs++
		}
		v := VMStats{ID: ve.vm.ID, Removed: removed[i], Submitted: ve.submitted.Load(), Rejected: ve.rejected.Load(),
			Tables: ve.vm.Tables(), Refused: ve.vm.Refused(), Roots: ve.roots.Load()}
		for _, s := range e.shards {
			c := &s.VMs[ve.slot]
			for i := range v.Kinds {
				v.Kinds[i] += c.Kinds[i].Load()
			}
			v.Callbacks += c.Callbacks.Load()
			v.OverBudget += c.OverBudget.Load()
			for b := range v.Latency {
				v.Latency[b] += c.Latency[b].Load()
			}
		}
		if !removed[i] {
			st.Refused += v.Refused
		}
		st.PerVM = append(st.PerVM, v)
	}
	sort.Slice(st.PerVM, func(i, j int) bool { return st.PerVM[i].ID < st.PerVM[j].ID })
	return st
}

// RootPanics returns how many callback panics were recovered for root id.
func (e *Engine) RootPanics(id uint32) uint64 {
	if c, ok := e.panicRoots.Load(id); ok {
		return c.Load()
	}
	return 0
}
