//go:build !linux

package shard

import (
	"errors"
	"fmt"
	"runtime"
)

// AllowedCPUs returns the CPUs the process may run on. CPU affinity is only
// supported on Linux; elsewhere it returns an error wrapping
// errors.ErrUnsupported.
func AllowedCPUs() ([]int, error) {
	return nil, fmt.Errorf("shard: CPU affinity: %w", errors.ErrUnsupported)
}

// Pin locks the calling goroutine to its current OS thread and would restrict
// that thread to cpu. CPU affinity is only supported on Linux; elsewhere the
// thread stays locked and Pin returns an error wrapping errors.ErrUnsupported.
func Pin(cpu int) error {
	runtime.LockOSThread()
	return fmt.Errorf("shard: cannot pin thread to CPU %d: %w", cpu, errors.ErrUnsupported)
}
