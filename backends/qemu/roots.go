package qemu

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/vasmon"
)

// Root discovery and retirement for Linux x86-64 guests (see the package
// comment). The lifecycle goroutine starts and stops roots; the drainer
// flags roots whose table page it sees rewritten, and with Config.Sync
// starts the roots of new PGDs itself while their vCPU is held. Both hold
// Guest.lifeMu while they start or stop roots, never while they talk to
// QEMU (QMP): a QMP stop waits for the held vCPUs, which wait for the
// drainer.

const (
	userEntries  = 256 // root entries below this are the user half (4- and 5-level)
	recheckEvery = 100 * time.Millisecond
)

// Why a root was stopped.
const (
	whyKernel = iota + 1 // a write to its kernel half
	whyEmpty             // its user half was emptied
	whyCheck             // the periodic re-check found its kernel half changed
)

type opKind uint8

const (
	opDeath opKind = iota // stop op.st
	opBirth               // start the new top-level table at op.gpa
	opSync                // re-check every root, then close op.done
)

type op struct {
	kind opKind
	st   *rootState
	gpa  uint64
	done chan struct{}
}

type rootState struct {
	gpa   uint64
	info  *backends.RootInfo
	root  atomic.Pointer[vasmon.Root] // nil while starting
	dying atomic.Bool
	why   atomic.Int32
}

// Root is an address space the backend monitors.
type Root struct {
	Info *backends.RootInfo // the callback context
	Root *vasmon.Root
}

// RootStats count what root discovery did.
type RootStats struct {
	Samples     uint64        // CR3 samples (QMP round trips)
	SampleTime  time.Duration // time spent sampling
	Births      uint64        // new top-level tables reported by the plugin
	Started     uint64        // roots started (at birth or from a sampled CR3)
	StartFailed uint64        // engine Start failures
	NotPGD      uint64        // sampled CR3s rejected: not a live Linux PGD
	BadBirths   uint64        // births rejected: the kernel half is not the reference
	Unsupported uint64        // sampled vCPUs not in 4- or 5-level paging
	// Roots stopped because of a write to the kernel half, because their
	// user half was emptied, or by the periodic re-check.
	StoppedKernel, StoppedEmpty, StoppedCheck uint64
	StopFailed                                uint64
	Live                                      int  // roots monitored now
	Reference                                 bool // the reference kernel half is known
}

type lifeStats struct {
	samples, sampleNs, births, badBirths, started, startFailed, notPGD, unsupported atomic.Uint64
	stopped                                                                         [4]atomic.Uint64 // by why
	stopFailed                                                                      atomic.Uint64
	live                                                                            atomic.Int64
	ref                                                                             atomic.Bool
}

func (l *lifeStats) snapshot() RootStats {
	return RootStats{Samples: l.samples.Load(), SampleTime: time.Duration(l.sampleNs.Load()),
		Births: l.births.Load(), BadBirths: l.badBirths.Load(), Started: l.started.Load(), StartFailed: l.startFailed.Load(), NotPGD: l.notPGD.Load(),
		Unsupported: l.unsupported.Load(), StoppedKernel: l.stopped[whyKernel].Load(),
		StoppedEmpty: l.stopped[whyEmpty].Load(), StoppedCheck: l.stopped[whyCheck].Load(),
		StopFailed: l.stopFailed.Load(), Live: int(l.live.Load()), Reference: l.ref.Load()}
}

// Roots returns the roots monitored now.
func (g *Guest) Roots() []Root {
	var out []Root
	g.roots.Range(func(_ uint64, st *rootState) bool {
		if r := st.root.Load(); r != nil {
			out = append(out, Root{Info: st.info, Root: r})
		}
		return true
	})
	return out
}

// watchRoot runs on the drainer for every record: it flags the root whose
// table page the plugin found no longer a live PGD at the record's store.
//
// The plugin decides, not the drainer: it sees the guest's stores as they
// happen, while the drainer and the engine run behind the guest, which may
// meanwhile have freed the page and reused it (as data, or as a table of
// another address space). At the store that ends the root, the plugin
// write-unprotects the page (its version word counts the change) and clears
// its root bit; from then on the engine proves nothing through the page
// (vasmon: a page that lost its protection is not read, the tables below it
// are not linked), so nothing the guest writes into it afterwards is
// reported, until Stop unhooks what is left.
func (g *Guest) watchRoot(r *record) {
	why := int32(r.Kind >> recRootEnd)
	if why == 0 {
		return
	}
	st, ok := g.roots.Load(r.GPA &^ (vasmon.PageSize - 1))
	if !ok || st.dying.Load() {
		return
	}
	if st.dying.CompareAndSwap(false, true) {
		st.why.Store(why)
		select {
		case g.ops <- op{kind: opDeath, st: st}:
		case <-g.lifeDone:
		}
	}
}

// newPGD runs on the drainer for a page the kernel has just filled with the
// kernel half of a new top-level table.
func (g *Guest) newPGD(gpa uint64) {
	g.ls.births.Add(1)
	select {
	case g.ops <- op{kind: opBirth, gpa: gpa}:
	case <-g.lifeDone:
	}
}

// userPresent reports whether the table at gpa has a present user-half entry.
func (g *Guest) userPresent(gpa uint64) bool {
	for i := uint64(0); i < userEntries; i++ {
		if g.ram.word(gpa+8*i)&vasmon.BitP != 0 {
			return true
		}
	}
	return false
}

// kernelHalf returns entries 256..511 of the table at gpa.
func (g *Guest) kernelHalf(gpa uint64) (k [512 - userEntries]uint64) {
	for i := range k {
		k[i] = g.ram.word(gpa + 8*(userEntries+uint64(i)))
	}
	return k
}

// lifecycle samples CR3s, starts and stops roots.
func (g *Guest) lifecycle() {
	defer close(g.lifeDone)
	sample := time.NewTicker(g.cfg.SampleEvery)
	defer sample.Stop()
	check := time.NewTicker(recheckEvery)
	defer check.Stop()
	for {
		select {
		case <-g.quitLife:
			return
		case o := <-g.ops:
			g.lifeMu.Lock()
			switch o.kind {
			case opDeath:
				g.stopRoot(o.st)
			case opBirth:
				g.birth(o.gpa)
			case opSync:
				g.recheck()
				close(o.done)
			}
			g.lifeMu.Unlock()
		case <-sample.C:
			if !g.paused.Load() && g.ctl != nil {
				g.sample()
			}
		case <-check.C:
			if !g.paused.Load() {
				g.lifeMu.Lock()
				g.recheck()
				g.lifeMu.Unlock()
			}
		}
	}
}

// detector holds the reference kernel half of the guest's PGDs.
type detector struct {
	ref    *[512 - userEntries]uint64
	mode   vasmon.Mode                          // paging mode of the CR3s that gave ref
	cand   map[[512 - userEntries]uint64]uint64 // kernel half -> first page seen with it
	failed atomic.Bool                          // sampling failed (QEMU gone)
}

// isPGD reports whether the page at gpa looks like a live Linux PGD. Until
// the reference kernel half is known, it learns it: the first kernel half
// (with a present entry) that two distinct sampled CR3 pages share.
func (g *Guest) isPGD(gpa uint64, mode vasmon.Mode) bool {
	d := g.det
	k := g.kernelHalf(gpa)
	if d.ref == nil {
		present := false
		for _, e := range k {
			present = present || e&vasmon.BitP != 0
		}
		if !present {
			return false
		}
		if first, ok := d.cand[k]; ok && first != gpa {
			d.ref, d.mode = &k, mode
			g.ls.ref.Store(true)
			// From now on the plugin reports new PGDs once the kernel
			// has copied the kernel half in.
			g.ctl.setReference(&k)
		} else {
			if len(d.cand) > 64 {
				clear(d.cand)
			}
			d.cand[k] = gpa
			return false
		}
	}
	return k == *d.ref && g.userPresent(gpa)
}

func modeOf(r cpuRegs) (vasmon.Mode, bool) {
	switch {
	case r.CR0&(1<<31) == 0: // paging off
		return 0, false
	case r.EFER&(1<<10) != 0 && r.CR4&(1<<12) != 0: // LMA, LA57
		return vasmon.Mode5, true
	case r.EFER&(1<<10) != 0:
		return vasmon.Mode4, true
	}
	return 0, false // 32-bit and PAE paging: not a Linux x86-64 guest
}

func (g *Guest) sample() {
	d := g.det
	if d.failed.Load() {
		return
	}
	t0 := time.Now()
	out, err := g.qmp.hmp("info registers -a")
	g.ls.samples.Add(1)
	g.ls.sampleNs.Add(uint64(time.Since(t0)))
	if err != nil {
		d.failed.Store(true) // QEMU has exited or is exiting
		return
	}
	regs, err := parseRegisters(out)
	if err != nil {
		d.failed.Store(true)
		return
	}
	type cand struct {
		gpa  uint64
		mode vasmon.Mode
	}
	var later []cand
	g.lifeMu.Lock()
	defer func() {
		g.lifeMu.Unlock()
		if len(later) > 0 {
			g.startStopped(func() {
				for _, c := range later {
					if _, known := g.roots.Load(c.gpa); !known && g.isPGD(c.gpa, c.mode) {
						g.startRoot(c.gpa, c.mode)
					}
				}
			})
		}
	}()
	for _, r := range regs {
		mode, ok := modeOf(r)
		if !ok {
			g.ls.unsupported.Add(1)
			continue
		}
		gpa := mode.RootGPA(r.CR3)
		if _, known := g.roots.Load(gpa); known || !g.ram.InRAM(gpa, vasmon.PageSize) {
			continue
		}
		if !g.isPGD(gpa, mode) {
			g.ls.notPGD.Add(1)
			continue
		}
		switch {
		case g.cfg.NullConsumer:
		case g.syncer != nil:
			later = append(later, cand{gpa, mode})
		default:
			g.startRoot(gpa, mode)
		}
	}
}

// startStopped runs start (which starts roots) under lifeMu with the
// guest's vCPUs stopped, unless the guest is paused (then not at all: the
// next sample finds the roots again). With Config.Sync, a root found by
// sampling is started so, as at a synchronous write: Start reads and hooks
// the tables while no vCPU can store into them unseen.
func (g *Guest) startStopped(start func()) {
	g.pauseMu.Lock()
	defer g.pauseMu.Unlock()
	if g.paused.Load() {
		return
	}
	if _, err := g.qmp.do("stop", nil); err != nil {
		return
	}
	g.lifeMu.Lock()
	g.pages.setStarting(true)
	start()
	g.pages.setStarting(false)
	g.lifeMu.Unlock()
	_, _ = g.qmp.do("cont", nil)
}

// birth starts a root for a new top-level table: its user half is still
// empty, so every table linked into it is hooked as it is linked.
//
// A birth on the page of a live root is the same PGD: Linux's memcpy may
// store an entry twice (its loop, then an overlapping tail store), or the
// root was started after this birth's record was drained and already covers
// the page's current content. A birth on the page of a dying root (its
// death is queued behind) is a new PGD: the old root is stopped first.
func (g *Guest) birth(gpa uint64) {
	d := g.det
	if st, known := g.roots.Load(gpa); known {
		if !st.dying.Load() {
			return
		}
		g.stopRoot(st)
	}
	if d.ref == nil || !g.ram.InRAM(gpa, vasmon.PageSize) {
		return
	}
	if !newKernelHalf(g.kernelHalf(gpa), d.ref) {
		g.ls.badBirths.Add(1)
		return
	}
	if !g.cfg.NullConsumer {
		g.startRoot(gpa, d.mode)
	}
}

// newKernelHalf reports whether k is the kernel half of a new top-level
// table: the reference's, or part of it being copied in (entry 511 first,
// when memcpy copies backwards), the rest still zero (pgd_alloc's page is
// zeroed).
func newKernelHalf(k [512 - userEntries]uint64, ref *[512 - userEntries]uint64) bool {
	if k[len(k)-1] != ref[len(ref)-1] {
		return false
	}
	for i := range k {
		if k[i] != ref[i] && k[i] != 0 {
			return false
		}
	}
	return true
}

func (g *Guest) startRoot(gpa uint64, mode vasmon.Mode) {
	st := &rootState{gpa: gpa, info: &backends.RootInfo{VM: g.ID, CR3: gpa, Mode: mode,
		Name: fmt.Sprintf("vm%d/cr3 %#x", g.ID, gpa)}}
	// Registered before Start hooks the page, so that the drainer watches
	// every write to it from the moment it is protected.
	g.roots.Store(gpa, st)
	g.ctl.setRoot(gpa, true)
	r, err := g.host.Start(g.ctx, g.ID, gpa, mode, g.req.Monitored, g.req.Callback, st.info, g.req.Options)
	if err != nil {
		g.ls.startFailed.Add(1)
		g.roots.Delete(gpa)
		g.ctl.setRoot(gpa, false)
		return
	}
	st.root.Store(r)
	g.ls.started.Add(1)
	g.ls.live.Add(1)
	// If the drainer flagged it during Start, its opDeath is queued.
}

func (g *Guest) stopRoot(st *rootState) {
	r := st.root.Load()
	if r == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := g.host.Stop(ctx, r); err != nil && !errors.Is(err, vasmon.ErrUnknownRoot) {
		g.ls.stopFailed.Add(1)
	}
	g.ls.stopped[st.why.Load()].Add(1)
	g.ls.live.Add(-1)
	st.root.Store(nil)
	g.roots.Delete(st.gpa)
	g.ctl.setRoot(st.gpa, false)
}

// recheck stops roots whose kernel half is no longer the reference.
func (g *Guest) recheck() {
	d := g.det
	if d.ref == nil {
		return
	}
	var dead []*rootState
	g.roots.Range(func(_ uint64, st *rootState) bool {
		if st.root.Load() != nil && g.kernelHalf(st.gpa) != *d.ref && st.dying.CompareAndSwap(false, true) {
			st.why.Store(whyCheck)
			dead = append(dead, st)
		}
		return true
	})
	for _, st := range dead {
		g.stopRoot(st)
	}
}
