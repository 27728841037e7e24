package main

import (
	"fmt"
	"math"
	"os"
	"strings"
	"unsafe"

	"github.com/vasengine/vasengine/shard"
)

// Limits checked at parse time, before anything starts: a configuration
// beyond them is a usage error (exit 2), not a run that ends only with
// SIGKILL.
const (
	// maxVMs is the engine's VM slots (engine.Config.MaxVMs, which the
	// command sets to it): -vms, -guests and a trace's VMs at once.
	maxVMs = 1024
	// maxShards bounds -shards whatever the CPUs: each shard is a worker
	// thread with its own queue and per-VM counters.
	maxShards = 256
	// shardsPerCPU bounds -shards against the CPUs the process may use:
	// beyond a few workers per CPU they only take turns.
	shardsPerCPU = 4
	// maxVCPUs bounds the simulator's -vcpus (a goroutine each).
	maxVCPUs = 64
	// maxProcesses bounds the simulator's -processes per VM.
	maxProcesses = 4096
	// simBytesPerVM is what a simulated VM costs before it runs (its
	// protection bitmap, table-area occupancy, kernel template and vCPU
	// state): 0.7 GB for 1024 VMs measured (`/usr/bin/time -v vasengine run
	// -vms 1024`), 680 KiB a VM; counted as 1 MiB.
	simBytesPerVM = 1 << 20
)

// queueSlotBytes is the host memory of one ingest queue slot: an event and
// its sequence number.
const queueSlotBytes = int64(unsafe.Sizeof(shard.Event{})) + 8

// queueBytes is the memory of shards queues of depth events each (the ring
// rounds its capacity up to a power of two).
func queueBytes(shards, depth int) int64 {
	n := int64(1)
	for n < int64(depth) {
		n <<= 1
	}
	return int64(shards) * n * queueSlotBytes
}

// memAvailable returns MemAvailable (else MemTotal) of /proc/meminfo in
// bytes, or 0 if unknown (a variable for tests).
var memAvailable = readMemAvailable

func readMemAvailable() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	var total, avail int64
	for _, l := range strings.Split(string(b), "\n") {
		var kb int64
		if n, _ := fmt.Sscanf(l, "MemAvailable: %d kB", &kb); n == 1 {
			avail = kb << 10
		}
		if n, _ := fmt.Sscanf(l, "MemTotal: %d kB", &kb); n == 1 {
			total = kb << 10
		}
	}
	if avail > 0 {
		return avail
	}
	return total
}

// checkMemory refuses a configuration whose fixed memory (queues, simulated
// VMs) exceeds half of the memory available now.
func checkMemory(what string, need int64) error {
	avail := memAvailable()
	if avail > 0 && need > avail/2 {
		return usagef("%s needs %s of memory, more than half of the %s available", what, bytesStr(need), bytesStr(avail))
	}
	return nil
}

// finite reports whether v is a finite number (flag parses "NaN" and "Inf").
func finite(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }

// shardLimit is the most shards for the CPUs this process may use.
func shardLimit() int {
	cpus, _ := shard.AllowedCPUs()
	return min(maxShards, shardsPerCPU*max(1, len(cpus)))
}
