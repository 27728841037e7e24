package kvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	gokvm "github.com/bobuhiro11/gokvm/kvm"

	"github.com/vasengine/vasengine/vasmon"
)

// Which paging modes a host's KVM runs cannot be asked: kvm_pvm (a
// software hypervisor) runs paged guests only in long mode, yet
// KVM_GET_SUPPORTED_CPUID still advertises PSE and PAE and KVM_SET_SREGS
// accepts CR0.PG outside long mode, silently keeping it clear. So Probe
// boots one vCPU of the mode through NewVM's own construction (newVM), with
// a program that reads a tagged word through the mode's kernel mapping,
// reports it on a port and halts.

// ErrModeUnsupported is wrapped by Probe, NewVM and Run when this host's KVM
// cannot run guests of a paging mode.
var ErrModeUnsupported = errors.New("kvm: paging mode not supported by this host's KVM")

// probeTimeout bounds the probe guest's run (a few instructions; generous
// for nested, emulated hosts).
const probeTimeout = 30 * time.Second

// GuestModes returns the paging modes the backend's guest program has:
// 4-level, PAE and 32-bit, in that order.
func GuestModes() []vasmon.Mode { return []vasmon.Mode{vasmon.Mode4, vasmon.ModePAE, vasmon.Mode32} }

// probes caches Probe's answers per mode for the life of the process.
var probes = struct {
	mu  sync.Mutex // held while probing: one probe at a time
	fn  func(vasmon.Mode) error
	res map[vasmon.Mode]error
}{fn: bootProbe}

// Probe reports whether guests of paging mode m run on this host: nil, or
// why not, as an error wrapping ErrNoKVM (no usable /dev/kvm),
// ErrModeUnsupported (the host's KVM cannot run the mode), or another
// error (KVM lacks a capability the backend needs). A mode the guest
// program does not have (5-level) is an error without asking the host.
// The first call for a mode boots a probe VM (tens of milliseconds); the
// answer is cached for the life of the process. Safe for concurrent use.
func Probe(m vasmon.Mode) error {
	if _, err := layoutOf(m); err != nil {
		return err
	}
	probes.mu.Lock()
	defer probes.mu.Unlock()
	if err, ok := probes.res[m]; ok {
		return err
	}
	err := probes.fn(m)
	if probes.res == nil {
		probes.res = make(map[vasmon.Mode]error)
	}
	probes.res[m] = err
	return err
}

// SetProbe makes Probe answer with f instead of booting a probe VM (f is
// asked once per mode, as the real probe is) and forgets the cached
// answers; restore puts back the previous probe and its answers. For tests
// of what a host that cannot run some mode does: NewVM itself does not
// consult Probe. f nil: the real probe.
func SetProbe(f func(vasmon.Mode) error) (restore func()) {
	if f == nil {
		f = bootProbe
	}
	probes.mu.Lock()
	defer probes.mu.Unlock()
	oldFn, oldRes := probes.fn, probes.res
	probes.fn, probes.res = f, nil
	return func() {
		probes.mu.Lock()
		defer probes.mu.Unlock()
		probes.fn, probes.res = oldFn, oldRes
	}
}

// bootProbe is the real probe: a one-vCPU VM of mode m built exactly as
// NewVM builds one (same memory, slots, GDT, boot tables, vCPU state, with
// the control registers read back), running genProbe.
func bootProbe(m vasmon.Mode) error { return runProbe(m, nil) }

// runProbe is bootProbe; prepare, if set, may alter the VM before it runs
// (tests).
func runProbe(m vasmon.Mode, prepare func(*VM)) error {
	vm, err := newVM(VMConfig{Paging: m, VCPUs: 1, Iterations: 1, probe: true})
	if err != nil {
		return err
	}
	defer vm.release()
	if prepare != nil {
		prepare(vm)
	}
	ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
	defer cancel()
	err = vm.Run(ctx)
	if err == nil && !vm.vcpus[0].done {
		err = fmt.Errorf("no answer within %v", probeTimeout)
	}
	if err != nil {
		return fmt.Errorf("%w: %v guests: the probe guest failed: %s", ErrModeUnsupported, m, oneLine(err))
	}
	return nil
}

// Control-register bits a paging mode depends on (checkSregs).
const (
	cr0PE, cr0PG   = 1, 1 << 31
	cr4PSE, cr4PAE = 1 << 4, 1 << 5
	eferLME        = 1 << 8
	eferLMA        = 1 << 10
	eferNXE        = 1 << 11
)

// checkSregs compares the control registers set on a vCPU with those read
// back, on the bits the paging mode depends on.
func checkSregs(m vasmon.Mode, set, got *gokvm.Sregs) error {
	const m0, m4, me = cr0PE | cr0PG, cr4PSE | cr4PAE, eferLME | eferLMA | eferNXE
	if set.CR0&m0 == got.CR0&m0 && set.CR4&m4 == got.CR4&m4 && set.EFER&me == got.EFER&me {
		return nil
	}
	why := ""
	if set.CR0&cr0PG != 0 && got.CR0&cr0PG == 0 {
		why = "; CR0.PG dropped"
		if m != vasmon.Mode4 && Module() == "kvm_pvm" {
			why += " (kvm_pvm runs paged guests only in long mode)"
		}
	}
	return fmt.Errorf("%w: %v guests: KVM_SET_SREGS set cr0=%#x cr4=%#x efer=%#x, read back cr0=%#x cr4=%#x efer=%#x%s",
		ErrModeUnsupported, m, set.CR0, set.CR4, set.EFER, got.CR0, got.CR4, got.EFER, why)
}

// Module returns the name of the loaded KVM vendor module (kvm_intel,
// kvm_amd, kvm_pvm), or "" when none is found.
func Module() string {
	for _, m := range []string{"kvm_pvm", "kvm_intel", "kvm_amd"} {
		if _, err := os.Stat("/sys/module/" + m); err == nil {
			return m
		}
	}
	return ""
}

// DirtyRingSupported reports whether dirty mode can run here (the KVM
// dirty ring, KVM_CAP_DIRTY_LOG_RING), and why not.
func DirtyRingSupported() error {
	f, err := os.OpenFile(Device, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrNoKVM, err)
	}
	defer f.Close()
	if checkExtension(int(f.Fd()), capDirtyLogRing) == 0 {
		return errors.New("kvm: dirty mode needs KVM_CAP_DIRTY_LOG_RING, which this kernel lacks")
	}
	return nil
}

// oneLine joins the lines of err's message (errors.Join makes several).
func oneLine(err error) string { return strings.ReplaceAll(err.Error(), "\n", "; ") }
