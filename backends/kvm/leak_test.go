package kvm

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
)

// vcpuResources counts this process's open vCPU fds and mappings of vCPU
// fds (run areas, dirty rings).
func vcpuResources(t *testing.T) (fds, maps int) {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && strings.Contains(l, "kvm-vcpu") {
			fds++
		}
	}
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "kvm-vcpu") {
			maps++
		}
	}
	return fds, maps
}

// TestNewVCPUFailureReleases: when NewVM fails while setting up a vCPU
// that already holds its fd, run-area mapping and (dirty mode) ring, none
// of them outlives the failure (issue 11 item 7).
func TestNewVCPUFailureReleases(t *testing.T) {
	requireKVM(t)
	e, err := engine.New(engine.Config{Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	injected := errors.New("injected vCPU setup failure")
	for _, mode := range []Mode{Trap, Dirty} {
		t.Run(mode.String(), func(t *testing.T) {
			if mode == Dirty {
				requireDirty(t)
			}
			for _, failAt := range []int{0, 1} {
				fds0, maps0 := vcpuResources(t)
				cfg := VMConfig{ID: 1, VCPUs: 2, Mode: mode, failVCPU: func(i int) error {
					if i == failAt {
						return injected
					}
					return nil
				}}
				vm, err := NewVM(e, backends.Request{}, cfg)
				if !errors.Is(err, injected) {
					if vm != nil {
						vm.Close(t.Context())
					}
					t.Fatalf("vCPU %d failing: NewVM returned %v, want the injected error", failAt, err)
				}
				if fds, maps := vcpuResources(t); fds != fds0 || maps != maps0 {
					t.Fatalf("vCPU %d failing: %d vCPU fds and %d vCPU mappings open after NewVM failed, %d and %d before",
						failAt, fds, maps, fds0, maps0)
				}
			}
		})
	}
	if st := e.Stats(); st.VMs != 0 {
		t.Fatalf("%d VMs registered after failed NewVMs", st.VMs)
	}
}
