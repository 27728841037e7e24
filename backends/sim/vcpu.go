package sim

import (
	"errors"
	"fmt"
	mathbits "math/bits"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// A vCPU hands at most maxBatch events to one Submit, and submits its batch
// after an operation once the oldest event in it has waited maxHold: the
// engine hooks a newly linked table only when it sees the link, and measures
// its latency budget from the trap.
const (
	maxBatch = 64
	maxHold  = 20 * time.Microsecond
)

// Store sites: each gives a store its own instruction pointer.
const (
	siteSetHi = iota
	siteSetLo
	siteSet
	siteClearLo
	siteClearHi
	siteClear
	siteUpdate
	siteZero
	siteCopy
	siteDataRandom
	siteDataCounter
	siteDataPointer
	siteDataText
	siteDataNarrow
)

// counters are one vCPU's, readable while it runs.
type counters struct {
	ops, writes, trapped                      [NumOps]atomic.Uint64
	hwAD, faults, cow, swapIns                atomic.Uint64
	submitted, rejected, batches              atomic.Uint64
	started, stopped, startErrors, stopErrors atomic.Uint64
	oom                                       atomic.Uint64
	syncStores, denied                        atomic.Uint64
	_                                         [64]byte
}

// vcpu is one simulated virtual CPU: a producer goroutine that runs its
// VM's processes one time slice at a time.
type vcpu struct {
	s     *Sim
	vm    *vm
	rng   *rand.Rand
	op    Op            // the operation being made: its stores are counted under it
	batch []shard.Event // trapped stores not yet submitted
	freeT []uint64      // table pages freed since the last flush (bit 0: may hold entries)
	freeR []uint64      // PAE root slots likewise
	sent  uint64        // trapped stores (pacing)
	share float64       // this vCPU's share of Config.Rate
	timer *time.Timer
	ctr   counters

	cur       *proc           // the process running (nil: none)
	syncer    backends.Syncer // synchronous stores (Config.Sync, SyncRoot); made at the first
	restoring bool            // the store being made puts back a denied store's bytes
}

func (c *vcpu) read(a uint64) uint64 {
	v, _ := c.vm.mem.ReadUint(a, c.vm.esz)
	return v
}

// store is one guest store of size bytes of v at gpa (within one entry): it
// goes to memory, and if the page is write-protected it traps, like an EPT
// write hook: the store is counted on the page's version word around its
// landing in memory (BeginWrite, EndWrite), and becomes an event carrying
// the whole entry's value before the store and that stamp. A page
// protected while an untrapped store lands (the host protects a page, then
// reads it) either has the store in the read or traps it: the protection is
// tested again after the store, which then traps after the fact
// (guestmem.Versions.Trap). Stores to unprotected pages are not stamped.
//
// A synchronous store (Config.Sync, SyncRoot) is submitted at once, after
// the batch, and the vCPU waits for its closure; if its callbacks deny it,
// the entry's old bytes are put back by another synchronous store and store
// returns false: the store did not take effect.
func (c *vcpu) store(gpa uint64, size int, v uint64, site int) bool {
	vm := c.vm
	ea := gpa &^ uint64(vm.esz-1)
	old, _ := vm.mem.ReadUint(ea, vm.esz)
	var ver uint32
	trapped := vm.ver.Protected(gpa)
	stamped := trapped // stamped before the store (shard.Event.Stamped)
	if vm.truth != nil {
		vm.truth.store(c, gpa, size, v, old, !trapped)
	}
	if trapped {
		ver = vm.ver.BeginWrite(gpa)
	}
	if _, err := vm.mem.WriteUint(gpa, size, v); err != nil {
		panic(err) // the model writes only inside its table area
	}
	if trapped {
		vm.ver.EndWrite(gpa)
	} else if vm.ver.Protected(gpa) {
		ver, trapped = vm.ver.Trap(gpa), true
	}
	if v != 0 {
		vm.occ[gpa/vasmon.PageSize].Or(1 << (gpa % vasmon.PageSize / 64))
	}
	c.ctr.writes[c.op].Add(1)
	if !trapped {
		return true
	}
	c.ctr.trapped[c.op].Add(1)
	if size < 8 {
		v &= 1<<(8*size) - 1
	}
	rip := vm.rip(c.op, site)
	if ver != 0 {
		// A stamped event goes without its RIP: the stamp tells a trap
		// delivered twice, and the engine's test on RIPs (the same RIP
		// and bytes as the last chunk applied to the entry) also drops a
		// store repeated after the entry changed through a read of its
		// page (mprotect setting NX, clearing it in a store the engine
		// found already in a read, setting it again).
		rip = 0
	}
	ev := shard.Event{GPA: gpa, Data: v, Old: old, HasOld: true, RIP: rip, Size: uint8(size), Trap: shard.Now(), Ver: ver,
		Stamped: stamped}
	c.sent++
	if c.restoring || c.syncing() {
		if c.syncSubmit(ev) != shard.Deny || c.restoring {
			return true
		}
		// Denied: put the old entry back, synchronously too (the
		// engine's stream ends old -> new, new -> old), in one store of
		// the whole entry: restoring only the bytes written (half of a
		// PAE entry) would be a partial write the engine holds pending
		// (SEMANTICS.md section 3) until the entry's next store.
		c.ctr.denied.Add(1)
		c.restoring = true
		c.store(ea, vm.esz, old, site)
		c.restoring = false
		return false
	}
	c.batch = append(c.batch, ev)
	if len(c.batch) == maxBatch {
		c.submit()
	}
	return true
}

// syncing reports whether the vCPU's trapped stores are synchronous now.
func (c *vcpu) syncing() bool {
	cfg := &c.s.cfg
	if cfg.SyncRoot == nil || c.cur == nil {
		return cfg.Sync
	}
	if r := c.cur.ref.Load(); r != nil {
		return cfg.SyncRoot(r.Info)
	}
	return false
}

// syncSubmit submits ev synchronously (the batch before it) and returns its
// verdict (Allow if it could not be submitted).
func (c *vcpu) syncSubmit(ev shard.Event) shard.Verdict {
	c.submit()
	if c.syncer == nil {
		sy, err := backends.NewSyncer(c.s.host, c.vm.id)
		if err != nil {
			c.ctr.rejected.Add(1)
			c.vm.trapped.Add(1)
			c.s.fail(fmt.Errorf("sim: VM %d: synchronous store: %w", c.vm.id, err))
			return shard.Allow
		}
		c.syncer = sy
	}
	var buf [1]shard.Event
	buf[0] = ev
	verdict, err := c.syncer.Submit(buf[:])
	c.vm.trapped.Add(1)
	c.ctr.syncStores.Add(1)
	if err != nil {
		c.ctr.rejected.Add(1)
		if !errors.Is(err, engine.ErrOverload) {
			c.s.fail(fmt.Errorf("sim: VM %d: synchronous submit: %w", c.vm.id, err))
		}
		return shard.Allow
	}
	c.ctr.submitted.Add(1)
	return verdict
}

// set writes e over a non-present entry at a. A PAE kernel writes the high
// half first, then the low half that holds P (set_pte).
func (c *vcpu) set(a, e uint64) {
	if c.vm.mode == vasmon.ModePAE {
		c.store(a+4, 4, e>>32, siteSetHi)
		c.store(a, 4, e&0xFFFFFFFF, siteSetLo)
		return
	}
	c.store(a, c.vm.esz, e, siteSet)
}

// setLink writes the table entry e over a non-present entry at a. Linux
// links a table in one 8-byte store on PAE too (set_pmd and set_pud are
// set_64bit: cmpxchg8b); only leaves are written in halves (set_pte).
func (c *vcpu) setLink(a, e uint64) { c.store(a, c.vm.esz, e, siteSet) }

// clear zeroes the entry at a. A PAE kernel clears the low half (P) first.
func (c *vcpu) clear(a uint64) {
	if c.vm.mode == vasmon.ModePAE {
		c.store(a, 4, 0, siteClearLo)
		c.store(a+4, 4, 0, siteClearHi)
		return
	}
	c.store(a, c.vm.esz, 0, siteClear)
}

// update rewrites a present entry in one atomic store (a locked
// read-modify-write; cmpxchg8b on PAE).
// It reports whether the store took effect (not denied).
func (c *vcpu) update(a, e uint64) bool { return c.store(a, c.vm.esz, e, siteUpdate) }

// hardwareAD is the CPU setting Accessed/Dirty in an entry: memory only,
// never trapped (see backends.DefaultMonitored).
func (c *vcpu) hardwareAD(a, e uint64) {
	if t := c.vm.truth; t != nil {
		t.store(c, a, c.vm.esz, e, c.read(a), false)
	}
	_, _ = c.vm.mem.WriteUint(a, c.vm.esz, e)
	c.ctr.hwAD.Add(1)
}

// each calls f with the index, address and value of every non-zero entry
// among the first n of the table at t, until f returns false. It reads only
// the 64-byte chunks that the occupancy summary says may hold entries, and
// forgets the chunks it finds empty (a table's chunks are written only under
// its process's lock; a PAE root slab page is shared, so it is read whole).
func (c *vcpu) each(t uint64, n int, f func(i int, a, e uint64) bool) {
	v := c.vm
	esz := v.esz
	if n*esz <= pdptSize {
		for i := 0; i < n; i++ {
			a := t + uint64(i*esz)
			if e := c.read(a); e != 0 && !f(i, a, e) {
				return
			}
		}
		return
	}
	w := &v.occ[t/vasmon.PageSize]
	per := 64 / esz
	for bits := w.Load(); bits != 0; bits &= bits - 1 {
		k := mathbits.TrailingZeros64(bits)
		i0 := k * per
		if i0 >= n {
			return
		}
		empty := true
		for i := i0; i < min(i0+per, n); i++ {
			a := t + uint64(i*esz)
			if e := c.read(a); e != 0 {
				empty = false
				if !f(i, a, e) {
					return
				}
			}
		}
		if empty && i0+per <= n {
			w.And(^(uint64(1) << k))
		}
	}
}

// zero clears n bytes of a table page being allocated (clear_page), storing
// only where it holds entries.
func (c *vcpu) zero(t uint64, n int) {
	c.each(t, n/c.vm.esz, func(_ int, a, _ uint64) bool {
		c.store(a, c.vm.esz, 0, siteZero)
		return true
	})
}

// allocTable returns a zeroed table page, or 0 if the table area is
// exhausted.
func (c *vcpu) allocTable() uint64 {
	t, dirty := c.vm.allocPage()
	if t == 0 {
		c.ctr.oom.Add(1)
		return 0
	}
	if dirty {
		c.zero(t, vasmon.PageSize)
	}
	c.vm.occ[t/vasmon.PageSize].Store(0) // all zero now, and this vCPU's alone
	return t
}

// freeTable frees a table page once the stores that unlinked it are
// submitted; dirty says it may still hold entries.
func (c *vcpu) freeTable(t uint64, dirty bool) {
	if dirty {
		t |= 1
	}
	c.freeT = append(c.freeT, t)
}

// submit hands the pending events to the host.
func (c *vcpu) submit() {
	n := len(c.batch)
	if n == 0 {
		return
	}
	k, err := c.s.host.Submit(c.vm.id, c.batch)
	c.ctr.submitted.Add(uint64(k))
	c.ctr.rejected.Add(uint64(n - k))
	c.ctr.batches.Add(1)
	c.vm.trapped.Add(uint64(n))
	c.batch = c.batch[:0]
	if err != nil && !errors.Is(err, engine.ErrOverload) {
		c.s.fail(fmt.Errorf("sim: VM %d: submit: %w", c.vm.id, err))
	}
}

// flush ends an operation: it submits the pending events, reuses the table
// pages the operation freed (most become data at once: reuse) and submits
// again, then releases the pages, so that another vCPU's stores to a
// reused page are submitted after this vCPU's stores to it, as the
// engine's per-entry ordering requires. Pages are released only here, at
// the end of an operation, so that their reuse does not depend on when
// batches happen to be submitted.
func (c *vcpu) flush() {
	c.submit()
	if len(c.freeT) > 0 {
		c.reuse()
		c.submit()
	}
	c.vm.release(c.freeT, c.freeR)
	c.freeT, c.freeR = c.freeT[:0], c.freeR[:0]
}

// start monitors p's root (the pending events submitted first) and runs
// Config.OnStart before p makes another store.
func (c *vcpu) start(p *proc) {
	c.submit()
	s, v := c.s, c.vm
	info := &backends.RootInfo{VM: v.id, CR3: p.root, Mode: v.mode, Name: fmt.Sprintf("vm%d/pid %d", v.id, p.pid)}
	if v.truth != nil {
		v.truth.started(info, p.root)
	}
	ctx, cancel := s.hostCtx()
	r, err := s.host.Start(ctx, v.id, p.root, v.mode, s.req.Monitored, s.req.Callback, info, s.req.Options)
	cancel()
	if v.truth != nil {
		v.truth.monitor(info, err == nil)
	}
	if err != nil {
		c.ctr.startErrors.Add(1)
		if errors.Is(err, engine.ErrClosed) || errors.Is(err, vasmon.ErrUnknownVM) {
			s.fail(fmt.Errorf("sim: VM %d: start: %w", v.id, err))
		}
		return
	}
	c.ctr.started.Add(1)
	ref := &Root{Info: info, Root: r, Mem: v.mem}
	p.ref.Store(ref)
	if s.cfg.OnStart != nil {
		s.cfg.OnStart(*ref)
	}
}

// stopRoot stops monitoring a root (nil: none), its pending events submitted
// first, and runs Config.OnStop.
func (c *vcpu) stopRoot(ref *Root) {
	if ref == nil {
		return
	}
	c.submit()
	c.s.stopRoot(ref, &c.ctr)
}

// pick locks a runnable process of the VM (a context switch), or returns nil
// if every one is running on another vCPU.
func (c *vcpu) pick() *proc {
	v := c.vm
	v.mu.Lock()
	defer v.mu.Unlock()
	n := len(v.procs)
	if n == 0 {
		return nil
	}
	k := c.rng.IntN(n)
	for i := 0; i < n; i++ {
		if p := v.procs[(k+i)%n]; p.mu.TryLock() {
			return p
		}
	}
	return nil
}

// done reports whether the vCPU must stop: the run is over or the VM's
// event budget is spent.
func (c *vcpu) done() bool {
	v := c.vm
	return c.s.stopped.Load() || v.quota > 0 && v.trapped.Load()+uint64(len(c.batch)) >= v.quota
}

// run is the vCPU's loop: pick a process, run operations until a context
// switch, a halt, the pacing or the end of the run, flush, let it go.
func (c *vcpu) run() {
	prof := &c.s.prof
	for !c.done() {
		p := c.pick()
		if p == nil {
			c.sleep(100 * time.Microsecond)
			continue
		}
		c.cur = p
		var wait time.Duration
		for {
			op := c.s.draw.draw(c.rng)
			c.do(p, op)
			if len(c.freeT)+len(c.freeR) > 0 {
				c.flush()
			} else if len(c.batch) > 0 && shard.Now()-c.batch[0].Trap >= int64(maxHold) {
				c.submit()
			}
			if op == OpHalt {
				wait = prof.Halt
			} else if c.share > 0 || c.s.cfg.Burst.On > 0 {
				wait = c.s.delay(time.Now(), c.sent, c.share)
			}
			if p.dead || op == OpSwitch || wait > 0 || c.done() {
				break
			}
		}
		c.flush()
		c.cur = nil
		p.mu.Unlock()
		if wait > 0 {
			c.sleep(wait)
		}
	}
	c.flush()
}

// sleep idles the vCPU for d or until the run ends.
func (c *vcpu) sleep(d time.Duration) {
	if c.timer == nil {
		c.timer = time.NewTimer(d)
	} else {
		c.timer.Reset(d)
	}
	select {
	case <-c.timer.C:
	case <-c.s.stopCh:
		c.timer.Stop()
	}
}

func (c *vcpu) do(p *proc, op Op) {
	c.op = op
	c.ctr.ops[op].Add(1)
	switch op {
	case OpTouch:
		c.touch(p)
	case OpAD:
		c.age(p)
	case OpMmap:
		c.mmap(p)
	case OpMunmap:
		c.munmap(p)
	case OpMprotect:
		c.mprotect(p)
	case OpFork:
		c.fork(p)
	case OpExec:
		c.exec(p)
	case OpExit:
		c.exit(p)
	case OpCreate:
		c.create()
	case OpCollapse:
		c.collapse(p)
	case OpSplit:
		c.split(p)
	case OpSwapOut:
		c.swapOut(p)
	}
}
