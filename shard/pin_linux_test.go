package shard

import (
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func allowedCPUs(t *testing.T) []int {
	t.Helper()
	cpus, err := AllowedCPUs()
	if err != nil {
		t.Fatal(err)
	}
	if len(cpus) == 0 || !slices.IsSorted(cpus) {
		t.Fatalf("AllowedCPUs() = %v", cpus)
	}
	return cpus
}

// inGoroutine runs f on a fresh goroutine. Pin leaves the goroutine locked
// to its thread, so the runtime discards the (possibly pinned) thread when
// the goroutine exits and the test's own thread is never affected.
func inGoroutine(f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
}

func TestPin(t *testing.T) {
	for _, cpu := range allowedCPUs(t) {
		inGoroutine(func() {
			if err := Pin(cpu); err != nil {
				t.Errorf("Pin(%d): %v", cpu, err)
				return
			}
			var set unix.CPUSet
			if err := unix.SchedGetaffinity(0, &set); err != nil {
				t.Errorf("SchedGetaffinity: %v", err)
				return
			}
			if set.Count() != 1 || !set.IsSet(cpu) {
				t.Errorf("after Pin(%d), thread affinity has %d CPUs, CPU %d set: %v", cpu, set.Count(), cpu, set.IsSet(cpu))
			}
		})
	}
	// Pinning threads, possibly including the main thread, must not change
	// the allowed set, which the runtime also used for runtime.NumCPU.
	if got := allowedCPUs(t); len(got) != runtime.NumCPU() {
		t.Errorf("AllowedCPUs() = %v after pinning, runtime.NumCPU() = %d", got, runtime.NumCPU())
	}
}

func TestPinNotAllowed(t *testing.T) {
	allowed := allowedCPUs(t)
	bad := []int{-1, 4095}
	// The first CPU number below CPUSet's limit that is not allowed.
	for c := 0; c < 1024; c++ {
		if !slices.Contains(allowed, c) {
			bad = append(bad, c)
			break
		}
	}
	for _, cpu := range bad {
		inGoroutine(func() {
			before := new(unix.CPUSet)
			if err := unix.SchedGetaffinity(0, before); err != nil {
				t.Errorf("SchedGetaffinity: %v", err)
				return
			}
			err := Pin(cpu)
			if err == nil {
				t.Errorf("Pin(%d) succeeded; allowed CPUs are %v", cpu, allowed)
				return
			}
			msg := err.Error()
			if !strings.Contains(msg, "CPU "+strconv.Itoa(cpu)) || !strings.Contains(msg, formatCPUList(allowed)) {
				t.Errorf("Pin(%d) error %q does not name the CPU and the allowed set %v", cpu, msg, allowed)
			}
			after := new(unix.CPUSet)
			if err := unix.SchedGetaffinity(0, after); err != nil {
				t.Errorf("SchedGetaffinity: %v", err)
				return
			}
			if *after != *before {
				t.Errorf("failed Pin(%d) changed the thread's affinity", cpu)
			}
		})
	}
}
