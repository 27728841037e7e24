package shard

import (
	"errors"
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// startCPUs is the affinity mask of the main thread during package
// initialization, when the runtime keeps the main goroutine on it and no
// thread can have been pinned yet.
var startCPUs, startErr = func() (set unix.CPUSet, err error) {
	err = unix.SchedGetaffinity(0, &set)
	return set, err
}()

// AllowedCPUs returns, in ascending order, the CPUs the process may run on:
// the scheduler affinity mask it started with, as set by taskset or a cgroup
// cpuset. It is read once, during package initialization, so threads pinned
// by Pin do not change it.
func AllowedCPUs() ([]int, error) {
	if startErr != nil {
		return nil, fmt.Errorf("shard: reading CPU affinity: %w", startErr)
	}
	cpus := make([]int, 0, startCPUs.Count())
	for c := range len(startCPUs) * 64 {
		if startCPUs.IsSet(c) {
			cpus = append(cpus, c)
		}
	}
	return cpus, nil
}

// Pin locks the calling goroutine to its current OS thread with
// runtime.LockOSThread and restricts that thread to run only on cpu, which
// must be one of AllowedCPUs.
//
// The thread stays locked even if Pin returns an error, so the caller may
// carry on unpinned. A pinned goroutine must not call runtime.UnlockOSThread:
// the thread would return to the runtime's pool still pinned. If it exits
// while locked, the runtime terminates the thread instead (the main thread
// is parked for good rather than terminated).
func Pin(cpu int) error {
	runtime.LockOSThread()
	var set unix.CPUSet
	if cpu < 0 || cpu >= len(set)*64 {
		return pinError(cpu, fmt.Errorf("CPU number out of range [0, %d)", len(set)*64))
	}
	if startErr == nil && !startCPUs.IsSet(cpu) {
		return pinError(cpu, errors.New("CPU not in the process's affinity mask"))
	}
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return pinError(cpu, err)
	}
	return nil
}

func pinError(cpu int, err error) error {
	allowed := "unknown"
	if cpus, aerr := AllowedCPUs(); aerr == nil {
		allowed = formatCPUList(cpus)
	}
	return fmt.Errorf("shard: cannot pin thread to CPU %d (allowed CPUs: %s): %w", cpu, allowed, err)
}
