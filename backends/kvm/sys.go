package kvm

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"golang.org/x/sys/unix"
)

// What gokvm lacks, on golang.org/x/sys/unix: capability checks on the VM
// fd, KVM_ENABLE_CAP, the run area's MMIO and sync-regs fields, the dirty
// ring.

// Device is the KVM device node.
const Device = "/dev/kvm"

// Capabilities used (linux/kvm.h).
const (
	capNrMemslots    = 10
	capSyncRegs      = 74
	capReadonlyMem   = 81
	capImmediateExit = 136
	capDirtyLogRing  = 192
)

// Run-area offsets (struct kvm_run, linux/kvm.h; checked against the
// kernel headers).
const (
	runImmediateExit = 1
	runExitReason    = 8
	runExit          = 32  // the exit union
	runValidRegs     = 288 // kvm_valid_regs
	runSyncRIP       = 432 // s.regs.regs.rip
	syncX86Regs      = 1   // KVM_SYNC_X86_REGS
)

// Available reports whether /dev/kvm can be opened, and why not.
func Available() error {
	f, err := os.OpenFile(Device, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	return f.Close()
}

func ioctl(fd int, op, arg uintptr) (uintptr, error) {
	r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), op, arg)
	if e != 0 {
		return r, e
	}
	return r, nil
}

// checkExtension asks fd (the device or a VM) about a capability.
func checkExtension(fd int, capability uintptr) int {
	r, err := ioctl(fd, gokvm.IIO(0x03), capability)
	if err != nil {
		return 0
	}
	return int(r)
}

// enableCap is KVM_ENABLE_CAP on a VM fd.
func enableCap(fd int, capability uint32, args ...uint64) error {
	var c struct {
		Cap   uint32
		Flags uint32
		Args  [4]uint64
		Pad   [64]byte
	}
	c.Cap = capability
	copy(c.Args[:], args)
	_, err := ioctl(fd, gokvm.IIOW(0xA3, unsafe.Sizeof(c)), uintptr(unsafe.Pointer(&c)))
	return err
}

// resetDirtyRings is KVM_RESET_DIRTY_RINGS.
func resetDirtyRings(vmfd int) (int, error) {
	r, err := ioctl(vmfd, gokvm.IIO(0xC7), 0)
	return int(r), err
}

// runArea is a vCPU's mmapped struct kvm_run.
type runArea []byte

func (r runArea) data() *gokvm.RunData { return (*gokvm.RunData)(unsafe.Pointer(&r[0])) }

func (r runArea) exitReason() uint32 { return r.data().ExitReason }

// mmio returns the MMIO exit's fields.
func (r runArea) mmio() (gpa, data uint64, n uint32, write bool) {
	d := r.data()
	return d.Data[0], d.Data[1], uint32(d.Data[2]), byte(d.Data[2]>>32) != 0
}

// setMMIOData sets the value returned to an MMIO read.
func (r runArea) setMMIOData(v uint64) { r.data().Data[1] = v }

// syncRIP returns the RIP KVM stored in the run area on exit (sync regs).
func (r runArea) syncRIP() uint64 { return *(*uint64)(unsafe.Pointer(&r[runSyncRIP])) }

// setImmediateExit sets or clears kvm_run.immediate_exit atomically with
// request_interrupt_window (always 0 here) beside it.
func (r runArea) setImmediateExit(on bool) {
	v := uint32(0)
	if on {
		v = 1 << (8 * runImmediateExit)
	}
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&r[0])), v)
}

// setRegion is KVM_SET_USER_MEMORY_REGION; size 0 deletes the slot.
func setRegion(vmfd int, slot uint32, flags uint32, gpa, size uint64, host []byte) error {
	r := gokvm.UserspaceMemoryRegion{Slot: slot, Flags: flags, GuestPhysAddr: gpa, MemorySize: size}
	if size > 0 {
		r.UserspaceAddr = uint64(uintptr(unsafe.Pointer(&host[0])))
	}
	if err := gokvm.SetUserMemoryRegion(uintptr(vmfd), &r); err != nil {
		return fmt.Errorf("kvm: memory slot %d [%#x, +%#x) flags %#x: %w", slot, gpa, size, flags, err)
	}
	return nil
}

// Shadow-MMU invalidation policies (VMConfig.shadowSync).
const (
	syncAuto = iota
	syncOn
	syncOff
)

// ErrNoKVM is wrapped by NewVM (and Run) when /dev/kvm cannot be opened.
var ErrNoKVM = errors.New("kvm: /dev/kvm is not usable")
