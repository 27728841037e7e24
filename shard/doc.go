// Package shard hosts the engine's shard workers and the building blocks
// they are made of. The building blocks, described here, depend neither on
// the monitor nor on each other:
//
//   - Ring, a bounded lock-free multi-producer multi-consumer queue.
//   - Pin, AllowedCPUs and ParseCPUList, to bind a goroutine's thread to a
//     CPU.
//   - Histogram and HistSnapshot, a latency histogram written by one worker
//     and read by any goroutine.
//
// Ring may be used by any number of goroutines at once. A Histogram has a
// single writer, the goroutine that calls Record, and any number of
// concurrent readers. A HistSnapshot is a plain value owned by whoever
// holds it, like an int. Ring and Histogram must not be copied after first
// use.
//
// After construction, the methods of Ring, Histogram and HistSnapshot do not
// allocate and never block: a full or empty Ring is reported to the caller,
// who decides whether to retry, yield or drop. Pin, AllowedCPUs,
// ParseCPUList and BoundsNs allocate and are meant for setup.
//
// CPU pinning is implemented on Linux only; elsewhere Pin and AllowedCPUs
// return an error wrapping errors.ErrUnsupported.
package shard
