package kvm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"golang.org/x/sys/unix"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/guestmem"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// VMConfig configures one guest.
type VMConfig struct {
	ID         vasmon.VMID
	Paging     vasmon.Mode // vasmon.Mode4 (default), ModePAE or Mode32
	VCPUs      int         // 1..16; 0: 2
	Seed       uint64      // the guest's PRNG seed
	Iterations uint64      // guest iterations per vCPU; 0: until the VM is stopped
	Mode       Mode        // Trap (default) or Dirty
	// Null applies trapped writes but submits nothing (benchmark baseline).
	Null bool
	// Sync submits each trapped write synchronously (trap mode;
	// SEMANTICS.md section 7): the vCPU's thread, still out of KVM_RUN,
	// waits in a Syncer (backends.NewSyncer) until the write's closure is
	// done, so the guest never runs on a translation the engine has not
	// seen. The VM's write lock is held meanwhile: its other vCPUs' traps
	// wait too (they would have to, for the order of writes to one
	// entry). If the write's callbacks deny it, its store is not
	// committed: the old entry is put back (a whole-entry store, stamped)
	// and submitted synchronously too, before the shadow zap and the
	// vCPU's return to the guest. Other vCPUs of the VM may read the
	// denied entry in guest memory meanwhile (a load of the table page,
	// or KVM building a shadow from it on a fault: the zap after the
	// restore drops that shadow): this backend does not pause them.
	Sync bool
	// OnStart, if set, is called on the announcing vCPU's thread right after
	// a root is started, while that vCPU is stopped (tests take the initial
	// walk here).
	OnStart func(*vasmon.Root)
	// HarvestEvery is the dirty-mode harvest period; 0: 1 ms.
	HarvestEvery time.Duration

	corrupt    func(gpa, data uint64) uint64 // tests: alter trapped writes
	noPause    bool                          // experiments: flip slots without pausing the vCPUs
	shadowSync int                           // experiments: syncAuto, syncOn, syncOff
	bench      bool                          // run the benchmark guest (genBench)
	failVCPU   func(i int) error             // tests: make newVCPU fail for vCPU i once it holds its fd and mappings
	probe      bool                          // run the probe guest (genProbe)
	timing     bool                          // benchmarks: time each trap and each Submit on the vCPU thread (VM.trapNs, submitNs)
}

// VMStats are a VM's counters.
type VMStats struct {
	ID                 vasmon.VMID
	Paging             vasmon.Mode // the guest's paging mode
	Traps              uint64      // trapped page-table writes applied (trap mode)
	SyncWrites, Denied uint64      // writes submitted synchronously (restores included); denied and not committed
	// Windows counts trapped writes that linked a table (an entry
	// pointing into the page-table pool) whose page was still not
	// write-protected when the vCPU went back to the guest: the guest
	// then runs on a link the engine has not hooked, and its writes into
	// that table are not trapped until the hook lands. 0 with Sync.
	Windows                    uint64
	Submitted, Rejected        uint64 // events given to the engine, and refused by it
	Reads                      uint64 // MMIO reads served (slot momentarily absent)
	IOExits, IntrExits         uint64
	RootsStarted, RootsStopped uint64
	Checks                     uint64 // guest read-back checks passed (reported at the end)
	Ops                        uint64 // guest iterations done (read at the end)
	Zaps                       uint64 // shadow-MMU invalidations (shadow paging)
	Flips                      uint64 // memslot flips (protect + unprotect)
	FlipTime, FlipMax          time.Duration
	Harvests, DirtyPages       uint64 // dirty mode
	Elapsed                    time.Duration
}

// VM is one KVM guest running the generated program on its vCPUs, and the
// engine's vasmon.Memory and vasmon.Protector for it.
type VM struct {
	cfg  VMConfig
	host engine.Host
	req  backends.Request
	l    *layout

	kvmFd, vmFd int
	ram         []byte
	ramMu       sync.RWMutex // Read holds it shared; Close exclusively
	closed      bool         // guarded by ramMu
	vcpus       []*vcpu
	syncRegs    bool
	added       bool

	// Slot flips: slotMu serializes them; gate keeps vCPUs out of KVM_RUN
	// while a slot is missing (vCPUs hold it shared around KVM_RUN).
	slotMu  sync.Mutex
	gate    sync.RWMutex
	prot    []bool // per pool page, guarded by slotMu
	logging bool   // dirty mode: slots carry KVM_MEM_LOG_DIRTY_PAGES

	// ver is the version word of every page (trap mode; nil in dirty
	// mode): the protected bits, kept by flip, and the count of the
	// trapped writes applied by mmio. The engine reads guest memory with
	// them (hostMemory).
	ver *guestmem.Versions

	// writeMu orders apply+submit of trapped writes across vCPUs.
	writeMu sync.Mutex

	// Shadow-MMU invalidation after each applied write (see zapShadows).
	zap     bool
	zapMu   sync.Mutex
	zapAt   uint64
	zapPage []byte

	rootsMu sync.Mutex
	roots   map[uint64]*vasmon.Root

	dirty *dirtyState

	// cfg.timing, guarded by writeMu: the time from each trapped write's
	// exit to the same vCPU's next one (the guest's cost of one trap), and
	// each Submit's time.
	trapNs, submitNs []int64

	stopping atomic.Bool
	st       struct {
		traps, submitted, rejected, reads, io, intr, started, stopped, flips, flipNs, flipMax,
		checks, ops, harvests, dirtyPages, zaps, syncWrites, denied, windows atomic.Uint64
	}
	elapsed time.Duration
}

type vcpu struct {
	vm    *VM
	index int
	fd    int
	run   runArea
	tid   atomic.Int32
	done  bool
	ev    [1]shard.Event
	sync  backends.Syncer // VMConfig.Sync; made at the first trap
	ring  []byte          // dirty ring (dirty mode)
	next  uint32          // next ring entry to harvest

	lastTrap int64 // cfg.timing: shard.Now of the last trapped write's exit
}

// NewVM creates the guest (memory, slots, vCPUs, program) and registers it
// with host. Close releases it. When this host's KVM cannot run the paging
// mode (it drops the control registers of the mode, as kvm_pvm does with
// CR0.PG outside long mode) NewVM fails with an error wrapping
// ErrModeUnsupported; Probe tells beforehand.
func NewVM(host engine.Host, req backends.Request, cfg VMConfig) (*VM, error) {
	if req.Monitored == 0 {
		req.Monitored = backends.DefaultMonitored
	}
	if req.Callback == nil {
		req.Callback = func(any, uint64, uint64, uint64, uint64) {}
	}
	if cfg.Sync && cfg.Mode == Dirty {
		return nil, errors.New("kvm: synchronous delivery needs trap mode (dirty mode sees writes only after the fact)")
	}
	vm, err := newVM(cfg)
	if err != nil {
		return nil, err
	}
	vm.host, vm.req = host, req
	if err := host.AddVM(vm.cfg.ID, vm.hostMemory(), vm, 0); err != nil {
		vm.release()
		return nil, err
	}
	vm.added = true
	return vm, nil
}

// newVM builds a guest ready to run, registered nowhere: NewVM's
// construction, which the probe (probe.go) shares.
func newVM(cfg VMConfig) (_ *VM, err error) {
	if cfg.Paging == 0 {
		cfg.Paging = vasmon.Mode4
	}
	if cfg.VCPUs == 0 {
		cfg.VCPUs = 2
	}
	if cfg.VCPUs < 1 || cfg.VCPUs > maxVCPUs {
		return nil, fmt.Errorf("kvm: %d vCPUs: want 1..%d", cfg.VCPUs, maxVCPUs)
	}
	l, err := layoutOf(cfg.Paging)
	if err != nil {
		return nil, err
	}
	gen := genGuest
	switch {
	case cfg.bench:
		gen = genBench
	case cfg.probe:
		gen = genProbe
	}
	code, err := gen(l)
	if err != nil {
		return nil, err
	}
	vm := &VM{cfg: cfg, l: l, kvmFd: -1, vmFd: -1, prot: make([]bool, poolPages),
		roots: make(map[uint64]*vasmon.Root)}
	defer func() {
		if err != nil {
			vm.release()
		}
	}()
	if vm.kvmFd, err = unix.Open(Device, unix.O_RDWR|unix.O_CLOEXEC, 0); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrNoKVM, Device, err)
	}
	fd, err := gokvm.CreateVM(uintptr(vm.kvmFd))
	if err != nil {
		return nil, fmt.Errorf("kvm: KVM_CREATE_VM: %w", err)
	}
	vm.vmFd = int(fd)
	if checkExtension(vm.vmFd, capReadonlyMem) == 0 {
		return nil, errors.New("kvm: KVM_CAP_READONLY_MEM is not supported: pages cannot be write-protected")
	}
	if n := checkExtension(vm.vmFd, capNrMemslots); n > 0 && n < poolPages+2 {
		return nil, fmt.Errorf("kvm: %d memory slots per VM, need %d", n, poolPages+2)
	}
	if checkExtension(vm.vmFd, capImmediateExit) == 0 {
		return nil, errors.New("kvm: KVM_CAP_IMMEDIATE_EXIT is not supported")
	}
	vm.syncRegs = checkExtension(vm.vmFd, capSyncRegs)&syncX86Regs != 0
	if cfg.Mode == Dirty {
		if err := vm.initDirty(); err != nil {
			return nil, err
		}
	} else {
		vm.ver = guestmem.NewVersions(ramSize)
	}
	vm.ram, err = unix.Mmap(-1, 0, ramSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("kvm: guest RAM: %w", err)
	}
	iters := cfg.Iterations
	if iters == 0 {
		iters = 1<<31 - 1
	}
	l.initMemory(vm.ram, code, cfg.VCPUs, cfg.Seed, iters)
	if cfg.bench {
		l.initBench(vm.ram)
	}
	flags := uint32(0)
	if vm.logging {
		flags = 1 // KVM_MEM_LOG_DIRTY_PAGES
	}
	if err := setRegion(vm.vmFd, 0, flags, 0, poolPhys, vm.ram); err != nil {
		return nil, err
	}
	for i := 0; i < poolPages; i++ {
		gpa := uint64(poolPhys + i*4096)
		if err := setRegion(vm.vmFd, uint32(1+i), flags, gpa, 4096, vm.ram[gpa:]); err != nil {
			return nil, err
		}
	}
	hi := uint64(poolPhys + poolPages*4096)
	if err := setRegion(vm.vmFd, poolPages+1, flags, hi, ramSize-hi, vm.ram[hi:]); err != nil {
		return nil, err
	}
	vm.zap = cfg.Mode == Trap && (cfg.shadowSync == syncAuto && shadowPaging() || cfg.shadowSync == syncOn)
	if vm.zap {
		vm.zapPage = vm.ram[zapHost : zapHost+4096]
		if err := setRegion(vm.vmFd, zapSlot, 0, zapGPA, 4096, vm.zapPage); err != nil {
			return nil, err
		}
	}
	for i := 0; i < cfg.VCPUs; i++ {
		v, err := vm.newVCPU(i)
		if err != nil {
			return nil, err
		}
		vm.vcpus = append(vm.vcpus, v)
	}
	return vm, nil
}

// newVCPU creates vCPU i and sets it up to start the program. On failure
// it releases what it had acquired (its fd, run area and ring) and
// returns nil.
func (vm *VM) newVCPU(i int) (_ *vcpu, err error) {
	fd, err := gokvm.CreateVCPU(uintptr(vm.vmFd), i)
	if err != nil {
		return nil, fmt.Errorf("kvm: KVM_CREATE_VCPU %d: %w", i, err)
	}
	v := &vcpu{vm: vm, index: i, fd: int(fd)}
	defer func() {
		if err != nil {
			v.release()
		}
	}()
	size, err := gokvm.GetVCPUMMmapSize(uintptr(vm.kvmFd))
	if err != nil {
		return nil, err
	}
	if v.run, err = unix.Mmap(v.fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		return nil, fmt.Errorf("kvm: mmap of the run area: %w", err)
	}
	if vm.syncRegs {
		*(*uint64)(unsafe.Pointer(&v.run[runValidRegs])) = syncX86Regs
	}
	if vm.dirty != nil {
		if err := v.mapRing(); err != nil {
			return nil, err
		}
	}
	cpuid := gokvm.CPUID{Nent: 256, Entries: make([]gokvm.CPUIDEntry2, 256)}
	if err := gokvm.GetSupportedCPUID(uintptr(vm.kvmFd), &cpuid); err == nil {
		if err := gokvm.SetCPUID2(uintptr(v.fd), &cpuid); err != nil {
			return nil, fmt.Errorf("kvm: KVM_SET_CPUID2: %w", err)
		}
	}
	sr, err := gokvm.GetSregs(uintptr(v.fd))
	if err != nil {
		return nil, err
	}
	l := vm.l
	data := gokvm.Segment{Limit: 0xFFFFFFFF, Selector: 0x10, Typ: 3, Present: 1, DB: 1, S: 1, G: 1}
	code := gokvm.Segment{Limit: 0xFFFFFFFF, Selector: 0x18, Typ: 11, Present: 1, DB: 1, S: 1, G: 1}
	if l.long {
		code.Selector, code.DB, code.L = 0x08, 0, 1
	}
	sr.CS, sr.DS, sr.ES, sr.FS, sr.GS, sr.SS = code, data, data, data, data, data
	sr.TR = gokvm.Segment{Limit: 0x67, Typ: 11, Present: 1}
	sr.LDT = gokvm.Segment{Typ: 2, Present: 1, Limit: 0xFFFF}
	sr.GDT = gokvm.Descriptor{Base: l.kva(gdtPhys), Limit: 31}
	sr.CR3 = bootRoot
	sr.CR0 = 0x80010033 // PG WP NE ET MP PE
	switch l.mode {
	case vasmon.Mode4:
		sr.CR4, sr.EFER = 0x20, 0xD00 // PAE; NXE LMA LME
	case vasmon.ModePAE:
		sr.CR4, sr.EFER = 0x20, 0x800 // PAE; NXE
	case vasmon.Mode32:
		sr.CR4, sr.EFER = 0x10, 0 // PSE
	}
	if err := gokvm.SetSregs(uintptr(v.fd), sr); err != nil {
		return nil, fmt.Errorf("kvm: KVM_SET_SREGS: %w", err)
	}
	// KVM_SET_SREGS succeeds on kvm_pvm for a paging mode it cannot run,
	// silently dropping CR0.PG: read the registers back.
	back, err := gokvm.GetSregs(uintptr(v.fd))
	if err != nil {
		return nil, fmt.Errorf("kvm: KVM_GET_SREGS: %w", err)
	}
	if err := checkSregs(l.mode, sr, back); err != nil {
		return nil, err
	}
	area := cpuArea(i)
	regs := &gokvm.Regs{RIP: l.kva(codePhys), RSP: l.kva(area + cpuSize), RBP: l.kva(area), RFLAGS: 2}
	if err := gokvm.SetRegs(uintptr(v.fd), regs); err != nil {
		return nil, fmt.Errorf("kvm: KVM_SET_REGS: %w", err)
	}
	if vm.cfg.failVCPU != nil {
		if err := vm.cfg.failVCPU(i); err != nil {
			return nil, err
		}
	}
	return v, nil
}

// ID returns the VM's ID.
func (vm *VM) ID() vasmon.VMID { return vm.cfg.ID }

// Config returns the VM's effective configuration.
func (vm *VM) Config() VMConfig { return vm.cfg }

// Run runs every vCPU until each has finished its iterations (and halted),
// one fails, or ctx ends (then Run stops the vCPUs and returns nil). A
// guest failure (a read-back mismatch, a triple fault) is returned as an
// error. Run may be called once.
func (vm *VM) Run(ctx context.Context) error {
	t0 := time.Now()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make([]error, len(vm.vcpus))
	var wg sync.WaitGroup
	for i, v := range vm.vcpus {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if errs[i] = v.loop(ctx); errs[i] != nil {
				cancel()
			}
		}()
	}
	var hwg sync.WaitGroup
	if vm.dirty != nil {
		hwg.Add(1)
		go func() { defer hwg.Done(); vm.harvester(ctx) }()
	}
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-ctx.Done():
		vm.stop(finished)
	}
	cancel()
	hwg.Wait()
	if vm.dirty != nil {
		if err := vm.harvest(); err != nil {
			errs = append(errs, err)
		}
	}
	vm.elapsed = time.Since(t0)
	for _, v := range vm.vcpus {
		a := v.area()
		vm.st.checks.Add(vm.l.word64(a[wChecks*vm.l.word:]))
		vm.st.ops.Add(vm.l.word64(a[wOps*vm.l.word:]))
	}
	return errors.Join(errs...)
}

// stop kicks every vCPU out of KVM_RUN until all have returned.
func (vm *VM) stop(finished chan struct{}) {
	vm.stopping.Store(true)
	for {
		for _, v := range vm.vcpus {
			v.kick()
		}
		select {
		case <-finished:
			return
		case <-time.After(time.Millisecond):
		}
	}
}

// kick makes the vCPU leave KVM_RUN soon: immediate_exit covers a vCPU
// about to enter, the signal one inside.
func (v *vcpu) kick() {
	v.run.setImmediateExit(true)
	if tid := v.tid.Load(); tid != 0 {
		_ = unix.Tgkill(os.Getpid(), int(tid), unix.SIGURG) // Go's runtime ignores a stray SIGURG
	}
}

func (v *vcpu) area() []byte {
	a := cpuArea(v.index)
	return v.vm.ram[a : a+cpuSize]
}

func (l *layout) word64(b []byte) uint64 {
	if l.word == 8 {
		return binary.LittleEndian.Uint64(b)
	}
	return uint64(binary.LittleEndian.Uint32(b))
}

func (v *vcpu) loop(ctx context.Context) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	v.tid.Store(int32(unix.Gettid()))
	defer v.tid.Store(0)
	vm := v.vm
	for {
		if vm.stopping.Load() || ctx.Err() != nil {
			return nil
		}
		// gokvm's Run swallows EINTR, and KVM leaves exit_reason alone
		// when it returns EINTR before entering the guest (immediate_exit):
		// preset it so that such a return reads as KVM_EXIT_INTR, not as
		// the previous exit once more.
		v.run.data().ExitReason = uint32(gokvm.EXITINTR)
		vm.gate.RLock()
		err := gokvm.Run(uintptr(v.fd))
		vm.gate.RUnlock()
		if err != nil {
			return fmt.Errorf("kvm: vCPU %d: KVM_RUN: %w", v.index, err)
		}
		now := shard.Now()
		switch r := v.run.exitReason(); r {
		case uint32(gokvm.EXITMMIO):
			if err := v.mmio(now); err != nil {
				return err
			}
		case uint32(gokvm.EXITIO):
			vm.st.io.Add(1)
			if err := v.io(ctx); err != nil {
				return err
			}
		case uint32(gokvm.EXITINTR):
			vm.st.intr.Add(1)
		case exitRingFull:
			if err := vm.harvest(); err != nil {
				return err
			}
		case uint32(gokvm.EXITHLT):
			if v.done {
				return nil
			}
			return v.failure("halted before finishing")
		case uint32(gokvm.EXITSHUTDOWN):
			return v.failure("shutdown (triple fault)")
		case uint32(gokvm.EXITINTERNALERROR):
			return v.failure(fmt.Sprintf("internal error, suberror %d", v.run.data().Data[0]&0xFFFFFFFF))
		case uint32(gokvm.EXITFAILENTRY):
			return v.failure(fmt.Sprintf("entry failed, reason %#x", v.run.data().Data[0]))
		default:
			return v.failure(fmt.Sprintf("unexpected exit %d", r))
		}
	}
}

// failure describes a guest failure with the vCPU's registers.
func (v *vcpu) failure(what string) error {
	regs, err := gokvm.GetRegs(uintptr(v.fd))
	if err != nil {
		return fmt.Errorf("kvm: VM %d vCPU %d: %s", v.vm.cfg.ID, v.index, what)
	}
	cr := "control registers unreadable"
	if sr, err := gokvm.GetSregs(uintptr(v.fd)); err == nil {
		cr = fmt.Sprintf("cr0=%#x cr3=%#x cr4=%#x efer=%#x", sr.CR0, sr.CR3, sr.CR4, sr.EFER)
	}
	return fmt.Errorf("kvm: VM %d vCPU %d: %s: rip=%#x rax=%#x rbx=%#x rcx=%#x rdx=%#x rsi=%#x rdi=%#x %s",
		v.vm.cfg.ID, v.index, what, regs.RIP, regs.RAX, regs.RBX, regs.RCX, regs.RDX, regs.RSI, regs.RDI, cr)
}

// mmio handles an MMIO exit: a read of a page whose slot is momentarily
// absent, or a write to a write-protected page-table page.
func (v *vcpu) mmio(now int64) error {
	vm := v.vm
	gpa, data, n, write := v.run.mmio()
	if n == 0 || n > 8 || !vm.InRAM(gpa, uint64(n)) {
		return v.failure(fmt.Sprintf("MMIO access of %d bytes at %#x outside RAM", n, gpa))
	}
	if !write {
		vm.st.reads.Add(1)
		v.run.setMMIOData(vm.load(gpa, int(n)))
		return nil
	}
	if n < 8 {
		data &= 1<<(8*n) - 1
	}
	var rip uint64
	if vm.syncRegs {
		rip = v.run.syncRIP()
	}
	esz := uint64(vm.l.esz)
	vm.writeMu.Lock()
	if vm.cfg.timing {
		if v.lastTrap != 0 {
			vm.trapNs = append(vm.trapNs, now-v.lastTrap)
		}
		v.lastTrap = now
	}
	old := vm.load(gpa&^(esz-1), int(esz))
	if vm.cfg.corrupt != nil {
		data = vm.cfg.corrupt(gpa, data)
	}
	ver, ver2 := vm.beginWrite(gpa, n)
	vm.storeBytes(gpa, int(n), data)
	vm.endWrite(gpa, n, ver, ver2)
	vm.st.traps.Add(1)
	if vm.dirty == nil && !vm.cfg.Null {
		if ver != 0 || ver2 != 0 {
			// The stamp tells a trap delivered twice; the engine's
			// test on RIPs would also drop a store repeated after its
			// entry changed through a read of its page (sim, vcpu.store).
			rip = 0
		}
		v.ev[0] = shard.Event{GPA: gpa, Data: data, Old: old, HasOld: true, RIP: rip, Size: uint8(n), Trap: now,
			Ver: ver, Ver2: ver2, Stamped: true}
		var t int64
		if vm.cfg.timing {
			t = shard.Now()
		}
		if vm.cfg.Sync {
			if err := v.syncWrite(gpa, old, esz); err != nil {
				vm.writeMu.Unlock()
				return err
			}
		} else {
			vm.submit(v.ev[:])
		}
		if vm.cfg.timing {
			vm.submitNs = append(vm.submitNs, shard.Now()-t)
		}
		if e := vm.load(gpa&^(esz-1), int(esz)); e&vasmon.BitP != 0 {
			if a := e & 0x000FFFFFFFFFF000; a >= poolPhys && a < poolPhys+poolPages*4096 && !vm.ver.Protected(a) {
				vm.st.windows.Add(1)
			}
		}
	}
	vm.writeMu.Unlock()
	if vm.zap {
		return vm.zapShadows()
	}
	return nil
}

// syncWrite submits the write in v.ev synchronously (VMConfig.Sync), with
// the VM's write lock held; if its callbacks deny it, it puts the entry's
// old value (old, of esz bytes at the entry of gpa) back and submits that
// restoring store synchronously too.
func (v *vcpu) syncWrite(gpa, old, esz uint64) error {
	vm := v.vm
	if v.sync == nil {
		sy, err := backends.NewSyncer(vm.host, vm.cfg.ID)
		if err != nil {
			return fmt.Errorf("kvm: VM %d vCPU %d: synchronous trap mode: %w", vm.cfg.ID, v.index, err)
		}
		v.sync = sy
	}
	verdict := v.syncOne()
	if verdict != shard.Deny {
		return nil
	}
	vm.st.denied.Add(1)
	ea := gpa &^ (esz - 1)
	ver, ver2 := vm.beginWrite(ea, uint32(esz))
	cur := vm.load(ea, int(esz))
	vm.storeBytes(ea, int(esz), old)
	vm.endWrite(ea, uint32(esz), ver, ver2)
	v.ev[0] = shard.Event{GPA: ea, Data: old, Old: cur, HasOld: true, Size: uint8(esz), Trap: shard.Now(), Ver: ver, Ver2: ver2,
		Stamped: true}
	v.syncOne() // a restore is not asked for a verdict: it always happens
	return nil
}

// syncOne submits v.ev synchronously and returns its verdict (Allow if it
// was refused).
func (v *vcpu) syncOne() shard.Verdict {
	vm := v.vm
	verdict, err := v.sync.Submit(v.ev[:])
	vm.st.submitted.Add(1)
	vm.st.syncWrites.Add(1)
	if err != nil {
		vm.st.rejected.Add(1)
		return shard.Allow
	}
	return verdict
}

// beginWrite marks a trapped write of n bytes at gpa as in progress on the
// version word of each protected page it touches (one, unless the write
// crosses a page boundary, which KVM's emulator splits into two exits
// anyway) and returns the stamps (0: no versions, or not protected).
func (vm *VM) beginWrite(gpa uint64, n uint32) (ver, ver2 uint32) {
	if vm.ver == nil {
		return 0, 0
	}
	last := gpa + uint64(n) - 1
	if vm.ver.Protected(gpa) {
		ver = vm.ver.BeginWrite(gpa)
	}
	if last/4096 != gpa/4096 && vm.ver.Protected(last) {
		ver2 = vm.ver.BeginWrite(last)
	}
	return ver, ver2
}

// endWrite ends the writes beginWrite began.
func (vm *VM) endWrite(gpa uint64, n uint32, ver, ver2 uint32) {
	if ver != 0 {
		vm.ver.EndWrite(gpa)
	}
	if ver2 != 0 {
		vm.ver.EndWrite(gpa + uint64(n) - 1)
	}
}

// zapShadows makes KVM drop its shadow page tables, so that the guest's
// next accesses see the entry just written from user space (see
// shadowPaging). It moves a one-page slot outside guest RAM between two
// addresses: KVM invalidates its shadow MMU on every slot move or deletion.
func (vm *VM) zapShadows() error {
	vm.zapMu.Lock()
	defer vm.zapMu.Unlock()
	vm.zapAt ^= 1
	if err := setRegion(vm.vmFd, zapSlot, 0, zapGPA+vm.zapAt*4096, 4096, vm.zapPage); err != nil {
		return err
	}
	vm.st.zaps.Add(1)
	return nil
}

// shadowPaging reports whether KVM runs guests on shadow page tables here
// (no EPT/NPT: kvm_pvm, or kvm_intel ept=0, kvm_amd npt=0). KVM then keeps
// shadows of the guest's tables coherent by tracking the guest's writes to
// them, but a write that exits to user space (a read-only slot) and is
// applied there is invisible to it: the shadow must be dropped after it.
func shadowPaging() bool {
	for _, p := range []string{"/sys/module/kvm_intel/parameters/ept", "/sys/module/kvm_amd/parameters/npt"} {
		if b, err := os.ReadFile(p); err == nil && len(b) > 0 && (b[0] == 'Y' || b[0] == '1') {
			return false
		}
	}
	return true
}

func (vm *VM) submit(evs []shard.Event) {
	k, err := vm.host.Submit(vm.cfg.ID, evs)
	vm.st.submitted.Add(uint64(len(evs)))
	if err != nil {
		vm.st.rejected.Add(uint64(len(evs) - k))
	}
}

// io handles the guest's hypercalls (out dx, eax).
func (v *vcpu) io(ctx context.Context) error {
	vm := v.vm
	d := v.run.data()
	dir, size, port, _, off := d.IO()
	if dir != gokvm.EXITIOOUT || size != 4 {
		return v.failure(fmt.Sprintf("unexpected I/O: port %#x dir %d size %d", port, dir, size))
	}
	val := uint64(binary.LittleEndian.Uint32(v.run[off:]))
	switch port {
	case portCreate:
		return vm.startRoot(ctx, v, val)
	case portDestroy:
		return vm.stopRoot(ctx, val)
	case portDone:
		v.done = true
		return nil
	case portFail:
		a := v.area()
		w := vm.l.word
		return v.failure(fmt.Sprintf("guest check failed: code %d, got %#x want %#x", val,
			vm.l.word64(a[wGot*w:]), vm.l.word64(a[wWant*w:])))
	}
	return v.failure(fmt.Sprintf("write to unknown port %#x", port))
}

// startRoot starts monitoring an address space the guest announced.
func (vm *VM) startRoot(ctx context.Context, v *vcpu, cr3 uint64) error {
	info := &backends.RootInfo{VM: vm.cfg.ID, CR3: cr3, Mode: vm.l.mode,
		Name: fmt.Sprintf("vm%d/cpu%d/cr3=%#x", vm.cfg.ID, v.index, cr3)}
	r, err := vm.host.Start(ctx, vm.cfg.ID, cr3, vm.l.mode, vm.req.Monitored, vm.req.Callback, info, vm.req.Options)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("kvm: VM %d: start root %#x: %w", vm.cfg.ID, cr3, err)
	}
	vm.rootsMu.Lock()
	vm.roots[cr3] = r
	vm.rootsMu.Unlock()
	vm.st.started.Add(1)
	if vm.cfg.OnStart != nil {
		vm.cfg.OnStart(r)
	}
	return nil
}

// stopRoot stops monitoring an address space the guest is destroying.
func (vm *VM) stopRoot(ctx context.Context, cr3 uint64) error {
	vm.rootsMu.Lock()
	r := vm.roots[cr3]
	delete(vm.roots, cr3)
	vm.rootsMu.Unlock()
	if r == nil {
		return fmt.Errorf("kvm: VM %d: guest destroys unknown address space %#x", vm.cfg.ID, cr3)
	}
	if vm.dirty != nil {
		// Changes made before the announcement must reach the engine
		// before the root stops.
		if err := vm.harvest(); err != nil {
			return err
		}
	}
	if err := vm.host.Stop(ctx, r); err != nil && ctx.Err() == nil {
		return fmt.Errorf("kvm: VM %d: stop root %#x: %w", vm.cfg.ID, cr3, err)
	}
	vm.st.stopped.Add(1)
	return nil
}

// Roots returns the roots being monitored now.
func (vm *VM) Roots() []*vasmon.Root {
	vm.rootsMu.Lock()
	defer vm.rootsMu.Unlock()
	rs := make([]*vasmon.Root, 0, len(vm.roots))
	for _, r := range vm.roots {
		rs = append(rs, r)
	}
	return rs
}

// Stats returns the VM's counters.
func (vm *VM) Stats() VMStats {
	s := &vm.st
	return VMStats{ID: vm.cfg.ID, Paging: vm.cfg.Paging, Traps: s.traps.Load(), SyncWrites: s.syncWrites.Load(), Denied: s.denied.Load(), Windows: s.windows.Load(), Submitted: s.submitted.Load(), Rejected: s.rejected.Load(),
		Reads: s.reads.Load(), IOExits: s.io.Load(), IntrExits: s.intr.Load(),
		RootsStarted: s.started.Load(), RootsStopped: s.stopped.Load(), Checks: s.checks.Load(), Ops: s.ops.Load(),
		Zaps: s.zaps.Load(), Flips: s.flips.Load(), FlipTime: time.Duration(s.flipNs.Load()), FlipMax: time.Duration(s.flipMax.Load()),
		Harvests: s.harvests.Load(), DirtyPages: s.dirtyPages.Load(), Elapsed: vm.elapsed}
}

// Close removes the VM from the engine (stopping its roots) and releases
// it. Call it after Run has returned.
func (vm *VM) Close(ctx context.Context) error {
	var err error
	if vm.added {
		err = vm.host.RemoveVM(ctx, vm.cfg.ID)
		vm.added = false
	}
	vm.release()
	return err
}

func (vm *VM) release() {
	vm.ramMu.Lock()
	defer vm.ramMu.Unlock()
	if vm.closed {
		return
	}
	vm.closed = true
	for _, v := range vm.vcpus {
		v.release()
	}
	if vm.vmFd >= 0 {
		_ = unix.Close(vm.vmFd)
	}
	if vm.kvmFd >= 0 {
		_ = unix.Close(vm.kvmFd)
	}
	if vm.ram != nil {
		_ = unix.Munmap(vm.ram)
	}
}

// release unmaps the vCPU's ring and run area and closes its fd.
func (v *vcpu) release() {
	if v.sync != nil {
		v.sync.Close()
		v.sync = nil
	}
	if v.ring != nil {
		_ = unix.Munmap(v.ring)
		v.ring = nil
	}
	if v.run != nil {
		_ = unix.Munmap(v.run)
		v.run = nil
	}
	if v.fd >= 0 {
		_ = unix.Close(v.fd)
		v.fd = -1
	}
}

// hostMemory returns the VM's memory as the engine reads it: with the
// version words of its pages in trap mode (vasmon.Versioned), without in
// dirty mode, whose writes are not trapped (see dirty.go).
func (vm *VM) hostMemory() vasmon.Memory {
	if vm.ver == nil {
		return vm
	}
	return versioned{vm}
}

// versioned is a trap-mode VM's memory with its version words.
type versioned struct{ *VM }

// Versions implements vasmon.Versioned.
func (m versioned) Versions() *guestmem.Versions { return m.ver }

// Read implements vasmon.Memory: it copies guest RAM, reading aligned
// 8-byte words atomically (the guest and other vCPUs write concurrently).
func (vm *VM) Read(gpa uint64, dst []byte) error {
	if !vm.InRAM(gpa, uint64(len(dst))) {
		return fmt.Errorf("kvm: read of [%#x, +%#x) outside guest RAM", gpa, len(dst))
	}
	vm.ramMu.RLock()
	defer vm.ramMu.RUnlock()
	if vm.closed {
		return errors.New("kvm: VM closed")
	}
	for len(dst) > 0 {
		w := gpa &^ 7
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], atomic.LoadUint64((*uint64)(unsafe.Pointer(&vm.ram[w]))))
		c := copy(dst, b[gpa-w:])
		dst = dst[c:]
		gpa += uint64(c)
	}
	return nil
}

// InRAM implements vasmon.Memory.
func (vm *VM) InRAM(gpa, n uint64) bool { return gpa < ramSize && n <= ramSize-gpa }

// load reads n (1..8) bytes of guest RAM at gpa, little-endian.
func (vm *VM) load(gpa uint64, n int) uint64 {
	var b [8]byte
	_ = vm.Read(gpa, b[:n])
	return binary.LittleEndian.Uint64(b[:])
}

// storeBytes writes n bytes of v at gpa, updating each aligned 8-byte word
// atomically so that concurrent page walks never see a torn entry.
func (vm *VM) storeBytes(gpa uint64, n int, v uint64) {
	for n > 0 {
		w := gpa &^ 7
		off := gpa - w
		k := min(uint64(n), 8-off)
		mask := ^uint64(0)
		if k < 8 {
			mask = (1<<(8*k) - 1) << (8 * off)
		}
		p := (*uint64)(unsafe.Pointer(&vm.ram[w]))
		for {
			o := atomic.LoadUint64(p)
			if atomic.CompareAndSwapUint64(p, o, o&^mask|(v<<(8*off))&mask) {
				break
			}
		}
		v >>= 8 * k
		n -= int(k)
		gpa += k
	}
}

// Protect implements vasmon.Protector: the page's slot becomes read-only.
func (vm *VM) Protect(gpa uint64) error {
	if vm.dirty != nil {
		return vm.hookDirty(gpa, true)
	}
	return vm.flip(gpa, true)
}

// Unprotect implements vasmon.Protector: the page's slot becomes writable.
func (vm *VM) Unprotect(gpa uint64) error {
	if vm.dirty != nil {
		return vm.hookDirty(gpa, false)
	}
	return vm.flip(gpa, false)
}

// flip deletes a pool page's slot and re-creates it with the other flags
// (KVM cannot change a slot's READONLY flag in place). While the slot is
// missing, a guest page walk through the page would fault, so the VM's
// vCPUs are held out of KVM_RUN for the flip.
func (vm *VM) flip(gpa uint64, ro bool) error {
	if gpa%4096 != 0 || gpa < poolPhys || gpa >= poolPhys+poolPages*4096 {
		return fmt.Errorf("kvm: page %#x is not in the page-table pool: it cannot be write-protected", gpa)
	}
	i := (gpa - poolPhys) / 4096
	vm.slotMu.Lock()
	defer vm.slotMu.Unlock()
	if vm.prot[i] == ro {
		return fmt.Errorf("kvm: page %#x: protection already %v", gpa, ro)
	}
	vm.ramMu.RLock()
	defer vm.ramMu.RUnlock()
	if vm.closed {
		return errors.New("kvm: VM closed")
	}
	t0 := time.Now()
	if !vm.cfg.noPause {
		for _, v := range vm.vcpus {
			v.kick()
		}
		vm.gate.Lock()
		defer func() {
			for _, v := range vm.vcpus {
				v.run.setImmediateExit(vm.stopping.Load())
			}
			vm.gate.Unlock()
		}()
	}
	flags := uint32(0)
	if ro {
		flags |= 2 // KVM_MEM_READONLY
	}
	if vm.logging {
		flags |= 1
	}
	if err := setRegion(vm.vmFd, uint32(1+i), 0, gpa, 0, nil); err != nil {
		return err
	}
	// The vCPUs are out of KVM_RUN (unless noPause): no guest write
	// lands while the protected bit and the slot disagree.
	vm.ver.SetProtected(gpa, ro)
	if err := setRegion(vm.vmFd, uint32(1+i), flags, gpa, 4096, vm.ram[gpa:]); err != nil {
		vm.ver.SetProtected(gpa, !ro)
		return err
	}
	vm.prot[i] = ro
	d := uint64(time.Since(t0))
	vm.st.flips.Add(1)
	vm.st.flipNs.Add(d)
	if d > vm.st.flipMax.Load() {
		vm.st.flipMax.Store(d)
	}
	return nil
}
