package kvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"testing"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/vasmon"
)

// TestProbeCache: Probe asks the host once per mode and caches the answer,
// refuses a mode the guest program lacks without asking, and SetProbe's
// restore brings back the previous probe and its answers.
func TestProbeCache(t *testing.T) {
	outer := SetProbe(func(m vasmon.Mode) error { return fmt.Errorf("outer %v", m) })
	defer outer()
	_ = Probe(vasmon.Mode4) // cached in the outer probe
	asked := map[vasmon.Mode]int{}
	pae := fmt.Errorf("%w: pae guests: injected", ErrModeUnsupported)
	restore := SetProbe(func(m vasmon.Mode) error {
		asked[m]++
		if m == vasmon.ModePAE {
			return pae
		}
		return nil
	})
	for range 3 {
		for _, m := range GuestModes() {
			err := Probe(m)
			if (m == vasmon.ModePAE) != (err != nil) || err != nil && !errors.Is(err, ErrModeUnsupported) {
				t.Fatalf("Probe(%v) = %v", m, err)
			}
		}
	}
	if err := Probe(vasmon.Mode5); err == nil || !strings.Contains(err.Error(), "5-level") {
		t.Fatalf("Probe(5-level) = %v, want the guest's refusal", err)
	}
	for _, m := range GuestModes() {
		if asked[m] != 1 {
			t.Fatalf("the host was asked about %v %d times, want once: %v", m, asked[m], asked)
		}
	}
	if asked[vasmon.Mode5] != 0 {
		t.Fatal("the host was asked about 5-level")
	}
	restore()
	if err := Probe(vasmon.Mode4); err == nil || err.Error() != "outer 4-level" {
		t.Fatalf("after restore: Probe(4-level) = %v, want the outer probe's cached answer", err)
	}
}

// fakeTB records what requireMode does to a test.
type fakeTB struct {
	testing.TB
	skipped, failed string
}

func (f *fakeTB) Helper()           {}
func (f *fakeTB) Skip(args ...any)  { f.skipped = fmt.Sprint(args...); runtime.Goexit() }
func (f *fakeTB) Fatal(args ...any) { f.failed = fmt.Sprint(args...); runtime.Goexit() }

func callRequire(tb testing.TB, require func(testing.TB)) *fakeTB {
	f := &fakeTB{TB: tb}
	done := make(chan struct{})
	go func() { defer close(done); require(f) }()
	<-done
	return f
}

// TestRequireMode: with the probe's answers injected, a test of a mode the
// host cannot run skips with the reason, and fails instead when
// VASENGINE_REQUIRE_KVM is set; so does a host without /dev/kvm.
func TestRequireMode(t *testing.T) {
	old := skipOut
	skipOut = io.Discard
	defer func() { skipOut = old }()
	reason := "KVM_SET_SREGS set cr0=0x80010033, read back cr0=0x10033"
	defer SetProbe(func(m vasmon.Mode) error {
		if m == vasmon.Mode4 {
			return nil
		}
		return fmt.Errorf("%w: %v guests: %s", ErrModeUnsupported, m, reason)
	})()
	for _, require := range []bool{false, true} {
		if require {
			t.Setenv("VASENGINE_REQUIRE_KVM", "1")
		} else {
			t.Setenv("VASENGINE_REQUIRE_KVM", "")
		}
		for _, m := range GuestModes() {
			f := callRequire(t, func(tb testing.TB) { requireMode(tb, m) })
			got := f.skipped + f.failed
			switch {
			case m == vasmon.Mode4 && got != "":
				t.Fatalf("%v runs, yet requireMode skipped %q / failed %q", m, f.skipped, f.failed)
			case m == vasmon.Mode4:
			case require && f.failed == "", !require && f.skipped == "":
				t.Fatalf("%v, VASENGINE_REQUIRE_KVM=%v: skipped %q, failed %q", m, require, f.skipped, f.failed)
			case !strings.Contains(got, "SKIPPED: "+m.String()+" guests cannot run") || !strings.Contains(got, reason):
				t.Fatalf("%v: the message lacks the mode or the reason: %s", m, got)
			}
		}
		f := callRequire(t, requireDevice)
		if f.skipped != "" || f.failed != "" {
			t.Fatalf("requireDevice with a usable device: skipped %q, failed %q", f.skipped, f.failed)
		}
	}
	defer SetProbe(func(vasmon.Mode) error { return fmt.Errorf("%w: %s: no such file or directory", ErrNoKVM, Device) })()
	for _, require := range []bool{false, true} {
		v := map[bool]string{true: "1"}[require]
		t.Setenv("VASENGINE_REQUIRE_KVM", v)
		for _, fn := range []func(testing.TB){requireKVM, requireDevice} {
			f := callRequire(t, fn)
			msg := f.skipped
			if require {
				msg = f.failed
			}
			if !strings.Contains(msg, "is not usable here") || !strings.Contains(msg, "nested.sh") {
				t.Fatalf("no /dev/kvm, VASENGINE_REQUIRE_KVM=%q: skipped %q, failed %q", v, f.skipped, f.failed)
			}
		}
	}
}

// TestProbeGuestFails: the probe guest reports a wrong read as a failure
// (so a host that maps wrongly is refused, not only one that faults).
func TestProbeGuestFails(t *testing.T) {
	requireKVM(t)
	err := runProbe(vasmon.Mode4, func(vm *VM) { vm.ram[smallPhys] ^= 0xFF })
	if !errors.Is(err, ErrModeUnsupported) || !strings.Contains(err.Error(), fmt.Sprintf("guest check failed: code %d", failRead)) {
		t.Fatalf("probe with a wrong tag: %v", err)
	}
	if err := runProbe(vasmon.Mode4, nil); err != nil {
		t.Fatalf("probe: %v", err)
	}
}

// TestHostModes tells, per paging mode, whether this host's KVM runs the
// backend's guests (make test prints its skips). When the probe says a
// mode cannot run, a real guest of that mode must indeed fail: NewVM with
// ErrModeUnsupported, or its run.
func TestHostModes(t *testing.T) {
	requireDevice(t)
	for _, m := range GuestModes() {
		t.Run(m.String(), func(t *testing.T) {
			perr := Probe(m)
			if errors.Is(perr, ErrModeUnsupported) {
				e, err := engine.New(engine.Config{Shards: 1})
				if err != nil {
					t.Fatal(err)
				}
				defer e.Close()
				vm, err := NewVM(e, backends.Request{}, VMConfig{ID: 1, Paging: m, VCPUs: 1, Iterations: 20})
				if err == nil {
					err = vm.Run(context.Background())
					vm.Close(context.Background())
					if err == nil {
						t.Fatalf("the probe says %v guests cannot run (%v), yet one ran", m, perr)
					}
				} else if !errors.Is(err, ErrModeUnsupported) && strings.Contains(perr.Error(), "KVM_SET_SREGS") {
					t.Fatalf("the probe refused %v at KVM_SET_SREGS (%v); NewVM failed otherwise: %v", m, perr, err)
				}
				t.Logf("%v: a real guest failed as the probe said: %v", m, oneLine(err))
			}
			requireMode(t, m)
			t.Logf("%v guests run on this host's KVM (%s)", m, moduleName())
		})
	}
}
