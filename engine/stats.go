package engine

import (
	"sort"
	"time"

	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// Stats is a snapshot of the engine's counters. Events count the parts of
// stores split at a page boundary one by one.
type Stats struct {
	Submitted, Accepted, Rejected, Processed uint64
	Kinds                                    [5]uint64 // by vasmon.WriteKind
	Callbacks, OverBudget, Panics            uint64
	Batches, BatchEvents                     uint64
	Messages                                 uint64 // structural messages between shards
	Hooks, Unhooks                           uint64 // tables hooked and unhooked since New
	StaleWrites                              uint64 // writes already in their page's read, dropped
	// StaleReads counts tables guest memory no longer linked at their
	// place when they were read: hooks dropped, tables unhooked early.
	StaleReads uint64
	Resyncs    uint64 // pages read again (a value that could not be proven)
	// Proofs counts written values proven on guest memory; StampProofs
	// those proven by their store's stamp alone (shard.Event.Stamped),
	// without reading guest memory.
	Proofs, StampProofs uint64
	Expired             uint64        // partial writes ended after the pending timeout
	Floods              uint64        // pages found flooded: read now and then instead of trapped
	Polls               uint64        // reads of flooded pages
	Steals              uint64        // shard steps run by another thread than the shard's worker
	Spin                time.Duration // time workers spent polling idle queues
	QueueLen            int
	Tables              int64
	HostBytes           int64
	Refused             int64 // table hooks refused by budgets (current VMs)
	Roots, VMs          int
	Latency             shard.HistSnapshot
	// SyncStall is the stall of synchronous writes (Syncer.Submit), from
	// trap to return; Allowed and Denied count them by verdict.
	SyncStall       shard.HistSnapshot
	Allowed, Denied uint64
	PerVM           []VMStats
}

// VMStats are one VM's counters.
type VMStats struct {
	ID                  vasmon.VMID
	Slot                int  // the engine's counter slot of the VM
	Removed             bool // RemoveVM was called; counters kept until the slot is reused
	Submitted, Rejected uint64
	Kinds               [5]uint64
	Callbacks           uint64
	OverBudget          uint64                         // callbacks later than the latency budget
	Latency             [shard.VMLatencyBuckets]uint64 // see shard.VMLatencyBuckets
	Tables, Refused     int64
	Roots               int64
	Flooded             int64 // pages flooded now (read now and then instead of trapped)
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

// vmStats sums the counters of ve over the shards (those of its slot's
// current generation).
func (e *Engine) vmStats(ve *vmEntry) VMStats {
	v := VMStats{ID: ve.vm.ID, Slot: int(ve.slot), Submitted: ve.submitted.Load(), Rejected: ve.rejected.Load(),
		Tables: ve.vm.Tables(), Refused: ve.vm.Refused(), Roots: ve.roots.Load(), Flooded: ve.vm.Flooded()}
	gen := e.slotGen[ve.slot].Load()
	for _, s := range e.shards {
		c := &s.VMs[ve.slot]
		if c.Gen.Load() != gen {
			continue // the shard has seen no event of this VM yet
		}
		for i := range v.Kinds {
			v.Kinds[i] += c.Kinds[i].Load()
		}
		v.Callbacks += c.Callbacks.Load()
		v.OverBudget += c.OverBudget.Load()
		for b := range v.Latency {
			v.Latency[b] += c.Latency[b].Load()
		}
	}
	return v
}

// Stats returns a snapshot. Counters are read one by one while shards run,
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
		st.StaleWrites += c.StaleWrites.Load()
		st.StaleReads += c.StaleReads.Load()
		st.Resyncs += c.Resyncs.Load()
		st.Proofs += c.Proofs.Load()
		st.StampProofs += c.StampProofs.Load()
		st.Expired += c.Expired.Load()
		st.Floods += c.Floods.Load()
		st.Polls += c.Polls.Load()
		st.Steals += c.Steals.Load()
		st.Spin += time.Duration(c.SpinNs.Load())
		st.QueueLen += s.QueueLen()
		st.Tables += s.Tables()
		st.HostBytes += s.HostBytes()
		s.Hist.Snapshot(&h)
		st.Latency.Merge(&h)
	}
	e.stall.Snapshot(&st.SyncStall)
	st.Allowed, st.Denied = e.verdicts[shard.Allow].Load(), e.verdicts[shard.Deny].Load()
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
		v := e.vmStats(ve)
		v.Removed = removed[i]
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
