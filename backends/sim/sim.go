// Package sim is the simulator backend: simulated VMs whose guest kernels
// build and change page tables as real ones do, feeding every trapped
// page-table write to an engine.Host exactly as a hypervisor backend would.
//
// # Contract
//
// Ownership: the simulator owns each VM's guest-physical memory (a sparse
// guestmem.Memory of Config.RAM bytes), the version word of each of its
// pages (guestmem.Versions) and its write protection (a vasmon.Protector
// that keeps the protected bit of each page's version word, set and
// cleared by the host). The host reads the memory with its version words
// (vasmon.Versioned), which prove its reads against the guest's stores
// (SEMANTICS.md section 6, "No phantoms"). Every simulated store goes to
// memory; a store to a protected page also traps, like an EPT write hook:
// it is counted on the page's version word while it lands (BeginWrite,
// EndWrite) and becomes a shard.Event stamped with that count (Ver),
// shard.Now() at the trap, the entry's whole value before the store
// (HasOld); not the storing kernel code's RIP, which the simulator models
// (a RIP per store site) but leaves out of stamped events (see
// vcpu.store). Stores to unprotected pages go to memory only, unstamped. The CPU's own Accessed/Dirty updates never
// trap.
//
// Guest kernels: each VM runs an OS model in one paging mode. It allocates
// page-table pages from a table area of guest RAM (PAE roots are 32-byte
// slots of a slab, several per page, as Linux allocates them). Freed table
// pages are reused at once, as Linux's page allocator hands out hot pages:
// most become data (a few stores of random bytes, counters, pointers, ASCII
// text, 1- and 2-byte fields), which traps while the host's unhook of the
// freed table has not landed; all of them become tables again later, first
// in line (zeroed by stores where they hold anything). It copies a kernel half
// from a template into every new root and keeps, per process, the regions
// it maps, so that every store is one a kernel would make: demand faults,
// copy-on-write forks and breaks, exec, process creation, exit, mmap/munmap
// (emptied tables unlinked and freed), mprotect, THP collapse and split,
// swap-out, Accessed-bit aging. PAE kernels set a leaf with two 4-byte
// stores, high half first, and clear an entry low half first (Linux's
// set_pte and pte_clear); they link a table (set_pmd, set_pud: set_64bit)
// and update a present entry in one 8-byte atomic store
// (cmpxchg8b; Linux's 4-byte clear_bit on the low half is not simulated: it
// would leave the entry half-written under SEMANTICS.md section 3). 32-bit
// kernels write 4-byte entries, 4- and 5-level kernels 8-byte entries, in
// single stores. The profiles (Profiles) set the mix of operations.
//
// Roots: Run registers every VM (AddVM) and starts monitoring each process's
// root (Start, the callback context a *backends.RootInfo) when the process
// appears: a forked child once its copy of the tables is made, a created
// process or an exec'd program with its new, empty root (before the old one
// is stopped). A process's root is stopped when its teardown begins, before
// a single entry is cleared: that is where a real introspection agent hooks
// process exit (Windows' MmCleanProcessAddressSpace, Linux's exit_mmap),
// since the tables are about to be freed and reused, and following their
// teardown would cost one trap per cleared entry for mappings that Stop
// reports removed in one go. So the teardown's stores reach memory only
// (except on a PAE root slab page that other monitored roots share).
// Config.OnStart runs after Start returns and before the process makes
// another store (a test can walk the tree there); Config.OnStop after Stop
// returns. At the end, Run stops every remaining root, then removes the VMs.
//
// Concurrency: each VM runs Config.VCPUs vCPU goroutines, concurrent
// producers. A vCPU runs one process at a time, holding the process's lock
// for a time slice: every store to a process's tables is made under its
// lock, so stores to one entry are never concurrent. A vCPU batches its
// events (up to 64 per Submit, none held much longer than 20 us after the
// operation that trapped it) and submits them before it lets the process
// go, before it starts or stops a root, before it waits, and before the
// table pages it freed can be reused, so that for every entry the order of
// submissions is the order of the stores in memory. The host's hooks run
// concurrently with the stores: a store tests its page's protection before
// it lands and again after, so a page protected meanwhile (the host
// protects, then reads) sees the store either in its read or as an event,
// stamped after the fact (guestmem.Versions.Trap).
//
// Determinism: each vCPU draws its decisions from its own generator seeded
// from Config.Seed, and freed pages are reused in a fixed order, so with one
// vCPU per VM the sequence of stores of each VM is a function of the seed.
// Which of them trap depends on when the host hooks tables: the event stream
// is deterministic when the host's protection is (a host that protects
// every page, for instance).
//
// Allocation: the simulator allocates while it runs (tables of freed pages,
// process records); events go through a per-vCPU buffer reused across
// Submits. Fixed costs per VM: the version words (RAM/512 bytes, touched
// only where pages are protected or written while protected) and one
// occupancy word per page of the table area (RAM/4, at most 1 GiB: RAM/512
// bytes) that lets table scans skip empty 64-byte chunks.
package sim

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/guestmem"
	"github.com/vasengine/vasengine/vasmon"
)

// Config configures a simulation. The zero value is valid: one VM in 32-bit
// mode running the web profile with 4 processes and one vCPU, as fast as
// possible, until Run's context ends.
type Config struct {
	VMs       int         // simulated VMs; 0: 1
	VCPUs     int         // vCPUs per VM; 0: 1
	Mode      vasmon.Mode // paging mode of every VM; 0: VM i runs in vasmon.Modes[i%4]
	Profile   string      // workload profile (Profiles); "": web
	Seed      uint64
	RAM       uint64 // guest RAM per VM in bytes; 0: 2 GiB; at least 64 MiB; at most 4 GiB in 32-bit mode
	Processes int    // processes per VM at start; 0: 4; forks stop at 2*Processes+2
	// Rate is the trapped events per second each VM produces, shared among
	// its vCPUs and counted during Burst's on periods; 0: as fast as
	// possible.
	Rate  float64
	Burst Burst // on/off shape of the rate; zero: steady
	// MaxEvents ends the run after this many trapped events in all, each
	// VM producing its share (MaxEvents/VMs); it may be overshot by the
	// stores of one operation per vCPU. Only trapped stores count: against
	// a host that protects nothing, it is never reached. 0: no limit.
	MaxEvents uint64
	Duration  time.Duration // ends the run after this long; 0: when the context ends
	FirstVM   vasmon.VMID   // ID of the first VM (the others follow); 0: 1

	// Sync makes every trapped store synchronous (SEMANTICS.md section 7):
	// the storing vCPU waits in the host's Syncer until the store's
	// closure is done (the tables it links hooked, those it unlinks
	// unhooked, every callback run), so the guest never runs on a
	// translation the host has not seen. A store whose callbacks deny it
	// (engine.RootOptions.Verdict) does not take effect: the vCPU puts the
	// entry's old bytes back before it goes on, submitting that restoring
	// store synchronously too, and the guest kernel carries on from the
	// entry as it finds it in memory (a denied table link leaves the
	// table unlinked and frees it; a denied replacement of a table keeps
	// it). No other vCPU reads the entry meanwhile: every store to a
	// process's tables is made under its lock. The host must hand out
	// Syncers (backends.NewSyncer).
	Sync bool
	// SyncRoot, if set, chooses per root instead of Sync: a trapped store
	// is synchronous when the process running on the vCPU is monitored
	// and SyncRoot returns true for its root (RootInfo.VM chooses per
	// VM). The other stores are batched as usual, and submitted before
	// the next synchronous one.
	SyncRoot func(*backends.RootInfo) bool

	// OnStart runs on the vCPU after a root's Start returned, before its
	// process makes another store; OnStop after its Stop returned. OnIdle
	// runs once every vCPU has stopped, before Run stops the remaining
	// roots. They must not block for long, nor call Run.
	OnStart, OnStop func(Root)
	OnIdle          func()

	// Tests (export_test.go): keep the ground truth; give the host the
	// guest memory without its version words.
	truth, unversioned bool
}

// Burst shapes the event rate: the vCPUs run for On, then idle for Off, in
// phase from the start of the run. Both zero: steady.
type Burst struct{ On, Off time.Duration }

// ParseBurst parses "ON/OFF" (e.g. "100ms/900ms"); "" is steady.
func ParseBurst(s string) (Burst, error) {
	if s == "" {
		return Burst{}, nil
	}
	on, off, ok := strings.Cut(s, "/")
	var b Burst
	var err1, err2 error
	b.On, err1 = time.ParseDuration(on)
	b.Off, err2 = time.ParseDuration(off)
	if !ok || err1 != nil || err2 != nil || b.On <= 0 || b.Off <= 0 {
		return Burst{}, fmt.Errorf("sim: burst %q: want ON/OFF durations, e.g. 100ms/900ms", s)
	}
	return b, nil
}

// Root is a monitored process root: its callback context, the engine's
// root and the VM's memory (to walk it).
type Root struct {
	Info *backends.RootInfo
	Root *vasmon.Root
	Mem  *guestmem.Memory
}

// Stats are a run's counters. Writes and Trapped count stores, by the
// operation that made them.
type Stats struct {
	Ops, Writes, Trapped [NumOps]uint64
	HardwareAD           uint64 // A/D bits set by the simulated CPU (memory only)
	Faults, COW, SwapIns uint64 // demand faults, copy-on-write breaks, swap-ins
	Submitted, Rejected  uint64 // events accepted and rejected by Submit
	Batches              uint64
	// Synchronous stores (Config.Sync, SyncRoot): SyncStores were
	// submitted synchronously (restores included), Denied were denied by
	// their callbacks and reverted (each by one more synchronous store).
	SyncStores, Denied uint64
	RootsStarted       uint64
	RootsStopped       uint64
	StartErrors        uint64
	StopErrors         uint64
	OOM                uint64 // operations cut short: a VM's table area was exhausted
	Processes          int    // live processes
	Tables             int64  // table pages in use
	// Running is how long the vCPUs ran (from the end of the boot to the
	// last vCPU's stop), once they all stopped; 0 before.
	Running time.Duration
}

// TotalWrites returns the stores made.
func (s *Stats) TotalWrites() uint64 { return sum(s.Writes[:]) }

// TotalTrapped returns the stores trapped (events).
func (s *Stats) TotalTrapped() uint64 { return sum(s.Trapped[:]) }

func sum(xs []uint64) uint64 {
	var n uint64
	for _, x := range xs {
		n += x
	}
	return n
}

// Sim is a set of simulated VMs. Create it with New; it runs once.
type Sim struct {
	cfg      Config
	prof     Profile
	draw     drawer
	vms      []*vm
	vcpus    []*vcpu
	maxProcs int
	ctr      counters // Run's own root stops

	host    engine.Host
	req     backends.Request
	hctx    context.Context // of Start, Stop, RemoveVM: not the run's, which ends first
	hcancel context.CancelFunc
	t0      time.Time
	running atomic.Int64 // how long the vCPUs ran (Stats.Running)

	ran      atomic.Bool
	stopped  atomic.Bool
	stopCh   chan struct{}
	stopOnce sync.Once
	errMu    sync.Mutex
	err      error
}

// New validates cfg and builds the VMs: memory, protection and the kernel
// template of each.
func New(cfg Config) (*Sim, error) {
	if cfg.VMs < 0 || cfg.VCPUs < 0 || cfg.Processes < 0 || cfg.Rate < 0 || cfg.Burst.On < 0 || cfg.Burst.Off < 0 {
		return nil, errors.New("sim: VMs, VCPUs, Processes, Rate and Burst must not be negative")
	}
	cfg.VMs, cfg.VCPUs, cfg.Processes = max(cfg.VMs, 1), max(cfg.VCPUs, 1), cmp0(cfg.Processes, 4)
	cfg.RAM = (cmp0(cfg.RAM, 2<<30) + vasmon.PageSize - 1) &^ (vasmon.PageSize - 1)
	cfg.FirstVM = cmp0(cfg.FirstVM, 1)
	if cfg.Profile == "" {
		cfg.Profile = "web"
	}
	prof, err := LookupProfile(cfg.Profile)
	if err != nil {
		return nil, err
	}
	if cfg.Mode != 0 && (cfg.Mode < vasmon.Mode32 || cfg.Mode > vasmon.Mode5) {
		return nil, fmt.Errorf("sim: %w: %v", vasmon.ErrBadMode, cfg.Mode)
	}
	if cfg.RAM < 64<<20 {
		return nil, fmt.Errorf("sim: RAM %d bytes: at least 64 MiB", cfg.RAM)
	}
	s := &Sim{cfg: cfg, prof: prof, draw: newDrawer(prof.Mix), maxProcs: 2*cfg.Processes + 2, stopCh: make(chan struct{})}
	for i := 0; i < cfg.VMs; i++ {
		mode := cfg.Mode
		if mode == 0 {
			mode = vasmon.Modes[i%len(vasmon.Modes)]
		}
		if mode == vasmon.Mode32 && cfg.RAM > 4<<30 {
			return nil, fmt.Errorf("sim: RAM %d bytes: a 32-bit guest has at most 4 GiB", cfg.RAM)
		}
		v := newVM(s, i, mode, cfg.RAM)
		if cfg.MaxEvents > 0 {
			v.quota = cfg.MaxEvents / uint64(cfg.VMs)
			if uint64(i) < cfg.MaxEvents%uint64(cfg.VMs) {
				v.quota++
			}
			if v.quota == 0 {
				v.quota = 1
			}
		}
		s.vms = append(s.vms, v)
		for j := 0; j < cfg.VCPUs; j++ {
			c := &vcpu{s: s, vm: v, rng: rand.New(rand.NewPCG(cfg.Seed, uint64(i)<<32|uint64(j))),
				share: cfg.Rate / float64(cfg.VCPUs)}
			s.vcpus = append(s.vcpus, c)
		}
		c := s.vcpus[i*cfg.VCPUs]
		c.op = OpSetup
		if !c.buildKernel() {
			return nil, fmt.Errorf("sim: VM %d: RAM too small for the kernel template", v.id)
		}
	}
	return s, nil
}

func cmp0[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// Config returns the effective configuration.
func (s *Sim) Config() Config { return s.cfg }

// Run registers the VMs with host, creates and starts monitoring their
// initial processes, runs the vCPUs until ctx ends, Config.Duration passes
// or the event budget is spent, then stops every root and removes the VMs.
// It returns ctx's error if ctx ended the run, the first fatal host error,
// or nil. Once the host reports it is closed (engine.ErrClosed), Run stops
// the vCPUs and calls the host no more.
func (s *Sim) Run(ctx context.Context, host engine.Host, req backends.Request) error {
	if !s.ran.CompareAndSwap(false, true) {
		return errors.New("sim: a Sim runs once")
	}
	if req.Callback == nil {
		req.Callback = func(any, uint64, uint64, uint64, uint64) {}
	}
	s.host, s.req = host, req
	s.hctx, s.hcancel = context.WithCancel(context.WithoutCancel(ctx))
	defer s.hcancel()
	parent := ctx
	if s.cfg.Duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.cfg.Duration)
		defer cancel()
	}
	for i, v := range s.vms {
		if v.truth != nil {
			v.truth.mask = req.Monitored | vasmon.BitP
		}
		if err := host.AddVM(v.id, v.hostMemory(), v.prot, 0); err != nil {
			for _, w := range s.vms[:i] {
				s.removeVM(w)
			}
			return fmt.Errorf("sim: VM %d: %w", v.id, err)
		}
	}
	finished := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			s.halt()
		case <-finished:
		}
	}()
	var wg sync.WaitGroup
	for _, v := range s.vms {
		wg.Go(func() { s.boot(v) })
	}
	wg.Wait()
	s.t0 = time.Now()
	for _, c := range s.vcpus {
		wg.Go(c.run)
	}
	wg.Wait()
	s.running.Store(int64(time.Since(s.t0)))
	for _, c := range s.vcpus {
		if c.syncer != nil {
			c.syncer.Close()
			c.syncer = nil
		}
	}
	close(finished)
	if s.cfg.OnIdle != nil {
		s.cfg.OnIdle()
	}
	for _, v := range s.vms {
		wg.Go(func() {
			for _, r := range s.roots(v) {
				s.stopRoot(r, &s.ctr)
			}
			s.removeVM(v)
		})
	}
	wg.Wait()
	s.errMu.Lock()
	defer s.errMu.Unlock()
	if s.err != nil {
		return s.err
	}
	return parent.Err()
}

// boot creates a VM's initial processes, as if the guest had been running
// before monitoring began: each is populated, then started.
func (s *Sim) boot(v *vm) {
	c := s.vcpus[v.idx*s.cfg.VCPUs]
	c.op = OpSetup
	for k := 0; k < s.cfg.Processes && !s.stopped.Load(); k++ {
		p := &proc{root: c.newRoot()}
		if p.root == 0 {
			break
		}
		c.initialRegions(p)
		for i := 16 + c.rng.IntN(48); i > 0; i-- {
			c.touch(p)
		}
		c.spawn(p)
	}
	c.flush()
}

// hostGone reports whether the host said it is closed: it is not called
// again (an engine's Stop after Close would wait for its context).
func (s *Sim) hostGone() bool {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	return errors.Is(s.err, engine.ErrClosed)
}

func (s *Sim) removeVM(v *vm) {
	if s.hostGone() {
		return
	}
	ctx, cancel := s.hostCtx()
	defer cancel()
	if err := s.host.RemoveVM(ctx, v.id); err != nil {
		s.fail(fmt.Errorf("sim: VM %d: remove: %w", v.id, err))
	}
}

func (s *Sim) hostCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(s.hctx, 30*time.Second)
}

func (s *Sim) stopRoot(ref *Root, ctr *counters) {
	if s.hostGone() {
		ctr.stopErrors.Add(1)
		return
	}
	if t := s.vms[ref.Info.VM-s.cfg.FirstVM].truth; t != nil {
		t.monitor(ref.Info, false)
	}
	ctx, cancel := s.hostCtx()
	err := s.host.Stop(ctx, ref.Root)
	cancel()
	if err != nil {
		ctr.stopErrors.Add(1)
		if errors.Is(err, engine.ErrClosed) {
			s.fail(fmt.Errorf("sim: VM %d: stop: %w", ref.Info.VM, err))
		}
	} else {
		ctr.stopped.Add(1)
	}
	if s.cfg.OnStop != nil {
		s.cfg.OnStop(*ref)
	}
}

func (s *Sim) halt() {
	s.stopOnce.Do(func() {
		s.stopped.Store(true)
		close(s.stopCh)
	})
}

func (s *Sim) fail(err error) {
	s.errMu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.errMu.Unlock()
	if errors.Is(err, engine.ErrClosed) {
		s.hcancel() // an engine's Start or Stop in progress would wait for its context
	}
	s.halt()
}

// delay returns how long a vCPU that has trapped sent events must wait to
// keep its share of the rate, or to sit out an off period of the burst.
func (s *Sim) delay(now time.Time, sent uint64, share float64) time.Duration {
	el := now.Sub(s.t0)
	on := el
	if b := s.cfg.Burst; b.On > 0 && b.Off > 0 {
		cyc := b.On + b.Off
		if r := el % cyc; r >= b.On {
			return cyc - r
		} else {
			on = el/cyc*b.On + r
		}
	}
	if share <= 0 {
		return 0
	}
	if ahead := time.Duration(float64(sent)/share*float64(time.Second)) - on; ahead > 100*time.Microsecond {
		return ahead
	}
	return 0
}

func (s *Sim) roots(v *vm) []*Root {
	v.mu.Lock()
	defer v.mu.Unlock()
	var rs []*Root
	for _, p := range v.procs {
		if r := p.ref.Load(); r != nil {
			rs = append(rs, r)
		}
	}
	return rs
}

// Roots returns the monitored roots of live processes. While vCPUs run
// (outside OnIdle) the processes may change them at any time.
func (s *Sim) Roots() []Root {
	var out []Root
	for _, v := range s.vms {
		for _, r := range s.roots(v) {
			out = append(out, *r)
		}
	}
	return out
}

// ProtectedPages returns how many guest pages are write-protected now.
func (s *Sim) ProtectedPages() int {
	n := 0
	for _, v := range s.vms {
		n += int(v.prot.n.Load())
	}
	return n
}

// Stats returns the run's counters; it may be called at any time.
func (s *Sim) Stats() Stats {
	var st Stats
	add := func(c *counters) {
		for i := range st.Ops {
			st.Ops[i] += c.ops[i].Load()
			st.Writes[i] += c.writes[i].Load()
			st.Trapped[i] += c.trapped[i].Load()
		}
		st.HardwareAD += c.hwAD.Load()
		st.Faults += c.faults.Load()
		st.COW += c.cow.Load()
		st.SwapIns += c.swapIns.Load()
		st.Submitted += c.submitted.Load()
		st.Rejected += c.rejected.Load()
		st.Batches += c.batches.Load()
		st.SyncStores += c.syncStores.Load()
		st.Denied += c.denied.Load()
		st.RootsStarted += c.started.Load()
		st.RootsStopped += c.stopped.Load()
		st.StartErrors += c.startErrors.Load()
		st.StopErrors += c.stopErrors.Load()
		st.OOM += c.oom.Load()
	}
	for _, c := range s.vcpus {
		add(&c.ctr)
	}
	st.Running = time.Duration(s.running.Load())
	add(&s.ctr)
	for _, v := range s.vms {
		v.mu.Lock()
		st.Processes += len(v.procs)
		v.mu.Unlock()
		st.Tables += v.tables.Load()
	}
	return st
}
