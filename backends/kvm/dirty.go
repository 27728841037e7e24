package kvm

import (
	"context"
	"encoding/binary"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vasengine/vasengine/shard"
)

// Dirty mode: nothing is write-protected. Every slot logs dirty pages into
// the per-vCPU KVM dirty rings; a harvester collects the dirtied pages every
// HarvestEvery (and whenever a ring fills or the guest destroys an address
// space), re-arms the logging (KVM_RESET_DIRTY_RINGS), and diffs each dirtied
// page that the engine has hooked against the shadow copy taken when it was
// hooked (or last harvested), submitting one event per changed entry
// (HasOld false: the engine's own shadow gives the old value).
//
// What it cannot see: the intermediate values of an entry written several
// times between two harvests (only the last one is reported, so a mapping
// made and removed in between is never seen), the order of writes within a
// harvest interval, and the writer's RIP; nor can it prove the engine's
// reads of guest memory (no version words: doc.go, "Dirty mode"). Choose it when the cost of a trap
// per page-table write (trap mode) is too high and a delayed, coalesced view
// of the address spaces is enough; choose trap mode for exact, synchronous
// events.

const (
	ringBytes     = 1 << 16 // 4096 entries of 16 bytes per vCPU
	ringPageOff   = 64      // KVM_DIRTY_LOG_PAGE_OFFSET
	exitRingFull  = 31      // KVM_EXIT_DIRTY_RING_FULL
	gfnDirty      = 1
	gfnReset      = 2
	dirtyGfnBytes = 16
)

type dirtyState struct {
	mu      sync.Mutex             // one harvest at a time; guards the rest
	shadows map[uint64]*[4096]byte // hooked pages: contents at the last look
	seen    map[uint64]struct{}    // scratch: pages of one harvest
	pages   []uint64               // scratch
	evs     []shard.Event          // scratch
}

func (vm *VM) initDirty() error {
	max := checkExtension(vm.vmFd, capDirtyLogRing)
	if max == 0 {
		return fmt.Errorf("kvm: dirty mode needs KVM_CAP_DIRTY_LOG_RING, which this kernel lacks")
	}
	size := ringBytes
	if size > max {
		size = max
	}
	if err := enableCap(vm.vmFd, capDirtyLogRing, uint64(size)); err != nil {
		return fmt.Errorf("kvm: enabling the dirty ring (%d bytes): %w", size, err)
	}
	vm.dirty = &dirtyState{shadows: make(map[uint64]*[4096]byte), seen: make(map[uint64]struct{})}
	vm.logging = true
	return nil
}

func (v *vcpu) mapRing() error {
	r, err := unix.Mmap(v.fd, ringPageOff*int64(unix.Getpagesize()), ringBytes, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("kvm: mmap of the dirty ring: %w", err)
	}
	v.ring = r
	return nil
}

// hookDirty records a page the engine hooks in dirty mode: its contents
// now are the base for later diffs.
func (vm *VM) hookDirty(gpa uint64, on bool) error {
	d := vm.dirty
	d.mu.Lock()
	defer d.mu.Unlock()
	if !on {
		delete(d.shadows, gpa)
		return nil
	}
	s := new([4096]byte)
	if err := vm.Read(gpa, s[:]); err != nil {
		return err
	}
	d.shadows[gpa] = s
	return nil
}

// slotGPA returns the guest-physical address of page off of a slot.
func slotGPA(slot uint32, off uint64) uint64 {
	switch {
	case slot == 0:
		return off * 4096
	case slot <= poolPages:
		return poolPhys + uint64(slot-1)*4096
	}
	return poolPhys + poolPages*4096 + off*4096
}

// harvest collects every vCPU's dirty pages, re-arms logging, and submits
// an event for each entry that changed on a hooked page.
func (vm *VM) harvest() error {
	d := vm.dirty
	d.mu.Lock()
	defer d.mu.Unlock()
	clear(d.seen)
	d.pages = d.pages[:0]
	n := uint32(ringBytes / dirtyGfnBytes)
	for _, v := range vm.vcpus {
		for {
			e := v.ring[(v.next%n)*dirtyGfnBytes:]
			flags := (*uint32)(unsafe.Pointer(&e[0]))
			if atomic.LoadUint32(flags)&gfnDirty == 0 {
				break
			}
			slot := binary.LittleEndian.Uint32(e[4:])
			off := binary.LittleEndian.Uint64(e[8:])
			gpa := slotGPA(slot&0xFFFF, off)
			if _, ok := d.seen[gpa]; !ok {
				d.seen[gpa] = struct{}{}
				d.pages = append(d.pages, gpa)
			}
			atomic.StoreUint32(flags, gfnReset)
			v.next++
		}
	}
	vm.st.harvests.Add(1)
	if len(d.pages) == 0 {
		return nil
	}
	if _, err := resetDirtyRings(vm.vmFd); err != nil {
		return fmt.Errorf("kvm: KVM_RESET_DIRTY_RINGS: %w", err)
	}
	vm.st.dirtyPages.Add(uint64(len(d.pages)))
	sort.Slice(d.pages, func(i, j int) bool { return d.pages[i] < d.pages[j] })
	now := shard.Now()
	d.evs = d.evs[:0]
	esz := vm.l.esz
	var cur [4096]byte
	for _, gpa := range d.pages {
		s := d.shadows[gpa]
		if s == nil {
			continue
		}
		if err := vm.Read(gpa, cur[:]); err != nil {
			return err
		}
		for off := 0; off < 4096; off += esz {
			var a, b uint64
			if esz == 8 {
				a, b = binary.LittleEndian.Uint64(s[off:]), binary.LittleEndian.Uint64(cur[off:])
			} else {
				a, b = uint64(binary.LittleEndian.Uint32(s[off:])), uint64(binary.LittleEndian.Uint32(cur[off:]))
			}
			if a != b {
				d.evs = append(d.evs, shard.Event{GPA: gpa + uint64(off), Data: b, Size: uint8(esz), Trap: now})
			}
		}
		*s = cur
	}
	if len(d.evs) > 0 {
		vm.submit(d.evs)
	}
	return nil
}

// harvester harvests every HarvestEvery until ctx ends.
func (vm *VM) harvester(ctx context.Context) {
	every := vm.cfg.HarvestEvery
	if every <= 0 {
		every = time.Millisecond
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			_ = vm.harvest()
		}
	}
}
