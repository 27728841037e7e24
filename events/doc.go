// Package events carries the engine's translation changes out of the host:
// every callback of every root becomes a fixed-size Record, the records are
// matched against rules (package events/rules) and the matches written to
// sinks (events/jsonl: JSON lines; events/natsink: NATS JetStream).
//
// # Contract
//
// Handoff: a root's callback runs on a shard worker (package engine). It
// builds a Record on its stack and copies it into a lane, a bounded
// lock-free ring (shard.Ring) of records: nothing is allocated and nothing
// locked on the shard's side. The VMs are spread over the lanes (VM mod
// lanes), so the records of one VM go through one lane, in the order their
// callbacks enqueued them. Callbacks of one root may run on several shards
// at once: a lane has many producers and one consumer.
//
// Concurrency: each lane has its own goroutine, which numbers the records
// of each VM (Record.Seq), evaluates the rules and hands the matches to
// every sink's bounded channel; each sink has its own goroutine that calls
// its Write in order. The records of one VM therefore reach every sink in
// order. Every method of Pipeline is safe for concurrent use.
//
// Backpressure: Config.OnFull says what a full lane or a full sink channel
// does. Block: the callback (a shard worker) or the lane goroutine waits
// for room, holding back the engine. Drop: the record or match is dropped
// and counted (vasengine_events_dropped_total, by sink and rule; sink
// "handoff", rule "" for records dropped before the rules saw them).
// Nothing is dropped silently; Close waits up to its context for the
// lanes and sinks to drain, and counts what it abandons as dropped.
//
// Allocation: the handoff allocates nothing. The lane goroutines allocate
// only for a VM seen for the first time; rule evaluation and the sinks'
// encoding allocate what they need, off the engine's threads.
//
// Ownership: a Match passed to Sink.Write is the sink's until Write
// returns; the slice is reused afterwards.
package events
