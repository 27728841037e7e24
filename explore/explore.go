package explore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// Config describes one schedule.
type Config struct {
	Seed   uint64
	Shards int           // 1..4
	Modes  []vasmon.Mode // one VM per mode
	Roots  int           // roots per VM (1 or 2)
	Writes int           // stores per VM
	// Sync makes some stores synchronous (engine.Syncer), Deny some of
	// their callbacks refuse them.
	Sync, Deny bool
	// Churn stops and restarts roots (some Stops with a context that ends
	// at a random step), removes and re-adds VMs (slot reuse).
	Churn bool
	// Reuse frees linked tables and writes data into their pages at once,
	// as Linux does.
	Reuse bool
	// Flood turns on the write-flood policy with small thresholds.
	Flood bool
	// Program, if not empty, supplies the stores' choices (the fuzzer's
	// bytes) before the seed's generator does.
	Program []byte
	// MaxSteps bounds the schedule (a hang is reported); 0: 200000.
	MaxSteps int
}

// Stats describe a schedule that ran.
type Stats struct {
	Steps, Stores, Traps, Callbacks, Checks int
	Engine                                  engine.Stats
}

// monitored is the set of bits every root of a schedule reports.
const monitored = vasmon.BitRW | vasmon.BitUS | vasmon.BitNX | vasmon.BitD | 0x000FFFFFFFFFF000

const (
	ramBytes  = 4 << 20
	poolBase  = 1 << 20
	poolPages = 8
	rootTabs  = 256 // each root's table budget
	linkSlots = 3   // entries 0..2 may link tables; present entries above have PS
)

// world is the state of one schedule.
type world struct {
	cfg     Config
	s       *sched
	e       *engine.Engine
	vms     []*vmState
	prog    []byte
	stats   Stats
	ctl     *actor
	cancels []cancel
	closed  bool // the engine was closed early
}

// vmState is one guest and its ground truth.
type vmState struct {
	w      *world
	id     vasmon.VMID
	mode   vasmon.Mode
	g      *vasmontest.Guest
	prot   *watchProt
	pool   []uint64
	cr3s   []uint64
	roots  []*rootState // by index of cr3s; nil when not monitored
	ever   []map[evKey]bool
	tables map[uint64]bool // pages that were tables of a root at some instant
	now    map[uint64]bool // pages that are tables of a root now
	// buf holds the traps of the vCPU that made the current operation;
	// bufs are the two vCPUs' rings, submitted at different times, so
	// that a trap reaches the engine after later traps of the other vCPU.
	buf     *[]shard.Event
	bufs    [2][]shard.Event
	syncer  *engine.Syncer
	clock   int64
	rip     uint64
	removed bool
	pause   bool
	paused  bool
	done    bool
}

type evKey struct {
	va, size, e uint64
}

// rootState is a monitored root and the map its callbacks keep.
type rootState struct {
	vm      *vmState
	i       int
	r       *vasmon.Root
	m       vasmontest.Map
	calls   int
	stopped bool // Stop called (its unhooking may go on in the background)
}

// watchProt is the VM's write protection: it keeps the version words and
// checks that only pages that were tables are ever protected.
type watchProt struct {
	*vasmontest.Protections
	vm *vmState
}

func (p *watchProt) Protect(gpa uint64) error {
	if !p.vm.tables[gpa] {
		p.vm.w.s.fail(fmt.Errorf("VM %d: page %#x protected, but it was never a table of a root", p.vm.id, gpa))
	}
	p.vm.w.s.note("VM %d protect %#x", p.vm.id, gpa)
	return p.Protections.Protect(gpa)
}

func (p *watchProt) Unprotect(gpa uint64) error {
	p.vm.w.s.note("VM %d unprotect %#x", p.vm.id, gpa)
	return p.Protections.Unprotect(gpa)
}

// Run runs one schedule and returns its statistics, or the first violation
// found (with the schedule's last steps).
func Run(cfg Config) (Stats, error) {
	if cfg.Shards <= 0 {
		cfg.Shards = 1
	}
	if cfg.Roots <= 0 {
		cfg.Roots = 1
	}
	if cfg.MaxSteps <= 0 {
		cfg.MaxSteps = 200000
	}
	if len(cfg.Modes) == 0 {
		cfg.Modes = []vasmon.Mode{vasmon.Mode4}
	}
	w := &world{cfg: cfg, s: newSched(cfg.Seed, cfg.MaxSteps), prog: cfg.Program}
	flood := vasmon.FloodPolicy{Writes: -1}
	if cfg.Flood {
		// Small thresholds on the explorer's trap clock: pages flood,
		// are polled and trapped again within a schedule.
		flood = vasmon.FloodPolicy{Writes: 6, Window: 400, Interval: 60, Quiet: 2}
	}
	e, err := engine.New(engine.Config{Shards: cfg.Shards, Driver: w.s, QueueDepth: 16, MaxBatch: 4, MaxVMs: 4,
		PendingTimeout: 50, Flood: flood})
	if err != nil {
		return w.stats, err
	}
	w.e = e
	for i, m := range cfg.Modes {
		w.vms = append(w.vms, w.newVM(vasmon.VMID(i+1), m))
	}
	w.s.onStep = w.schedStep
	w.ctl = w.s.spawn("controller", w.control)
	err = w.s.run()
	w.stats.Steps = w.s.steps
	if err != nil {
		return w.stats, fmt.Errorf("seed %d: %w\nlast steps:\n%s", cfg.Seed, err, strings.Join(w.s.trace, "\n"))
	}
	return w.stats, nil
}

// pick returns a choice in [0, n): from the program while it lasts, then
// from the seed.
func (w *world) pick(n int) int {
	if n <= 1 {
		return 0
	}
	if len(w.prog) > 0 {
		b := int(w.prog[0])
		w.prog = w.prog[1:]
		return b % n
	}
	return w.s.rng.IntN(n)
}

// schedStep is the scheduler's own move: a step of a shard (if nobody
// holds it), and the contexts that end now.
func (w *world) schedStep() {
	sh := w.e.Shards()[w.s.rng.IntN(len(w.e.Shards()))]
	if sh.TryAcquire() {
		n := 1 + w.s.rng.IntN(3)
		if sh.Step(n) {
			w.s.note("step shard %d (%d)", sh.ID(), n)
		}
		sh.Release()
	}
	for _, c := range w.cancels {
		if c.at == w.s.steps {
			w.s.note("context of %s ends", c.what)
			c.cancel()
		}
	}
}

func (w *world) newVM(id vasmon.VMID, mode vasmon.Mode) *vmState {
	g := vasmontest.NewGuest(mode, ramBytes, poolBase)
	v := &vmState{w: w, id: id, mode: mode, g: g, tables: map[uint64]bool{}, now: map[uint64]bool{}}
	v.buf = &v.bufs[0]
	v.prot = &watchProt{Protections: g.NewProtections(), vm: v}
	for range poolPages {
		v.pool = append(v.pool, g.AllocTable())
	}
	for r := range w.cfg.Roots {
		cr3 := v.pool[r]
		if mode == vasmon.ModePAE {
			cr3 += uint64(32 * w.pick(4))
		}
		v.cr3s = append(v.cr3s, cr3)
		v.ever = append(v.ever, map[evKey]bool{})
	}
	v.roots = make([]*rootState, len(v.cr3s))
	// An initial tree: a chain from each root through entries 0 and 1 of
	// the pool pages, a few leaves.
	top := mode.Levels()
	for r, cr3 := range v.cr3s {
		t := mode.RootGPA(cr3)
		for l := top; l > 1; l-- {
			next := v.pool[(r+top-l+2)%poolPages]
			v.set(t, r%2, v.link(next, l), false)
			t = next
		}
		v.set(t, 5+r, v.leafAt(1, 0x10000+uint64(r)<<12), false)
	}
	v.truth()
	return v
}

// link returns an entry linking table t from level l.
func (v *vmState) link(t uint64, l int) uint64 {
	if v.mode == vasmon.ModePAE && l == 3 {
		return t | vasmon.BitP
	}
	return t | vasmon.BitP | vasmon.BitRW | vasmon.BitUS
}

// leafAt returns a present entry that is a leaf at any level (PS set).
func (v *vmState) leafAt(_ int, frame uint64) uint64 {
	e := frame&^0xFFF | vasmon.BitP | vasmon.BitRW | vasmon.BitUS | vasmon.BitPS
	if v.mode.EntryBytes() == 4 {
		e &= 0xFFFFFFFF
	}
	return e
}

// set writes entry i of table t in one store, untrapped (setup).
func (v *vmState) set(t uint64, i int, e uint64, _ bool) {
	esz := v.mode.EntryBytes()
	_, _ = v.g.Mem.WriteUint(t+uint64(i*esz), esz, e)
}

// truth records the state of guest memory now: every root's mappings and
// tables join the sets of what ever existed.
func (v *vmState) truth() {
	for k := range v.now {
		delete(v.now, k)
	}
	for r, cr3 := range v.cr3s {
		p := vasmontest.WalkParams{CR3: cr3, Mode: v.mode, Monitored: monitored}
		m, ts, err := vasmontest.WalkBoth(v.g.Mem, p)
		if err != nil {
			v.w.s.fail(err)
			return
		}
		for k, e := range m {
			v.ever[r][evKey{k.VA, k.Size, e}] = true
		}
		for _, t := range ts {
			pg := t.GPA &^ (vasmon.PageSize - 1)
			v.tables[pg] = true
			v.now[pg] = true
		}
	}
}

// cancel is a context the scheduler ends at a step.
type cancel struct {
	at     int
	what   string
	cancel context.CancelFunc
}

func (w *world) ctxEndingSoon(what string) context.Context {
	ctx, c := context.WithCancel(context.Background())
	w.cancels = append(w.cancels, cancel{at: w.s.steps + 1 + w.s.rng.IntN(40), what: what, cancel: c})
	return ctx
}

// callback records a root's callback and checks it was true at some
// instant.
func (rs *rootState) callback(_ any, va, old, new, size uint64) {
	v := rs.vm
	v.w.stats.Callbacks++
	rs.calls++
	level := vasmontest.LevelOf(v.mode, size)
	if level == 0 {
		v.w.s.fail(fmt.Errorf("VM %d root %#x: callback with page size %#x", v.id, v.cr3s[rs.i], size))
		return
	}
	if v.mode.Classify(new, level) == vasmon.KindLeaf {
		if !v.ever[rs.i][evKey{va, size, new & (monitored | vasmon.BitP)}] {
			var seen []string
			for k := range v.ever[rs.i] {
				if k.va == va {
					seen = append(seen, fmt.Sprintf("%#x/%#x", k.e, k.size))
				}
			}
			v.w.s.fail(fmt.Errorf("VM %d root %#x: phantom: callback va=%#x old=%#x new=%#x size=%#x: that mapping never existed (at that VA: %v)",
				v.id, v.cr3s[rs.i], va, old, new, size, seen))
		}
	}
	vasmontest.Apply(rs.m, v.mode, monitored, []vasmontest.Event{{VA: va, Old: old, New: new, Size: size}})
	v.w.s.note("callback VM %d root %d va=%#x %#x -> %#x", v.id, rs.i, va, old, new)
}

// verdict is the callback of roots whose callbacks may refuse a
// synchronous write.
func (rs *rootState) verdict(ctx any, va, old, new, size uint64) shard.Verdict {
	rs.callback(ctx, va, old, new, size)
	if new&vasmon.BitP != 0 && new&vasmon.BitRW != 0 && (new>>12)%7 == 3 {
		return shard.Deny
	}
	return shard.Allow
}

// start starts root i of v (writers paused) and records its initial map.
func (v *vmState) start(i int) error {
	rs := &rootState{vm: v, i: i}
	opts := engine.RootOptions{Options: vasmon.Options{MaxTables: rootTabs}}
	if v.w.cfg.Deny {
		opts.Verdict = rs.verdict
	}
	r, err := v.w.e.Start(context.Background(), v.id, v.cr3s[i], v.mode, monitored, rs.callback, rs, opts)
	if err != nil {
		return fmt.Errorf("start VM %d root %d: %w", v.id, i, err)
	}
	if rs.calls != 0 {
		return fmt.Errorf("start of VM %d root %d reported %d callbacks", v.id, i, rs.calls)
	}
	m, err := vasmontest.Walk(v.g.Mem, vasmontest.WalkParams{CR3: v.cr3s[i], Mode: v.mode, Monitored: monitored})
	if err != nil {
		return err
	}
	rs.r, rs.m = r, m
	v.roots[i] = rs
	v.w.s.note("started VM %d root %d", v.id, i)
	return nil
}

// errors of the checks
var errCheck = errors.New("check")

func (w *world) failf(format string, args ...any) error {
	err := fmt.Errorf("%w: "+format, append([]any{errCheck}, args...)...)
	w.s.fail(err)
	return err
}

// control is the controller actor.
func (w *world) control() {
	ctx := context.Background()
	for _, v := range w.vms {
		if err := w.e.AddVM(v.id, v.g.Memory(), v.prot, 0); err != nil {
			w.s.fail(err)
			return
		}
		for i := range v.cr3s {
			if err := v.start(i); err != nil {
				w.s.fail(err)
				return
			}
		}
	}
	for _, v := range w.vms {
		v := v
		w.s.spawn(fmt.Sprintf("vcpu%d", v.id), v.writer)
	}
	if w.cfg.Churn {
		for k := 0; k < 6 && !w.writersDone(); k++ {
			if w.pick(12) == 0 {
				w.closeEarly()
				return
			}
			w.churn()
			for j := w.pick(40); j > 0; j-- {
				w.s.yield()
			}
		}
	}
	for !w.writersDone() {
		w.s.yield()
	}
	if err := w.quiescent(); err != nil {
		return
	}
	// Stop everything: nothing may stay hooked or protected.
	for _, v := range w.vms {
		for i, rs := range v.roots {
			if rs == nil || rs.stopped {
				continue
			}
			if err := w.e.Stop(ctx, rs.r); err != nil {
				w.failf("Stop VM %d root %d: %v", v.id, i, err)
				return
			}
			rs.stopped = true
		}
	}
	if err := w.quiescent(); err != nil {
		return
	}
	if err := w.e.Close(); err != nil {
		w.failf("Close: %v", err)
		return
	}
	st := w.e.Stats()
	w.stats.Engine = st
	if st.Submitted != st.Processed+st.Rejected {
		w.failf("accounting after Close: submitted %d != processed %d + rejected %d", st.Submitted, st.Processed, st.Rejected)
	}
}

// closeEarly closes the engine while the writers run (some blocked in
// synchronous submissions): nobody may hang, and every event submitted is
// processed or rejected.
func (w *world) closeEarly() {
	w.closed = true
	w.s.note("Close while writers run")
	if err := w.e.Close(); err != nil {
		w.failf("Close: %v", err)
		return
	}
	for !w.writersDone() {
		w.s.yield()
	}
	st := w.e.Stats()
	w.stats.Engine = st
	if st.Submitted != st.Processed+st.Rejected {
		w.failf("accounting after an early Close: submitted %d != processed %d + rejected %d", st.Submitted, st.Processed, st.Rejected)
	}
}

func (w *world) writersDone() bool {
	for _, v := range w.vms {
		if !v.done {
			return false
		}
	}
	return true
}

// pauseWriters stops the writers at their next store, their traps all
// submitted; resume lets them go on.
func (w *world) pauseWriters() {
	for _, v := range w.vms {
		v.pause = true
	}
	for {
		all := true
		for _, v := range w.vms {
			all = all && (v.done || v.paused)
		}
		if all {
			return
		}
		w.s.yield()
	}
}

func (w *world) resume() {
	for _, v := range w.vms {
		v.pause = false
	}
}

// churn makes one change of the monitoring while writers run (or paused
// for a Start, whose initial map must be known).
func (w *world) churn() {
	v := w.vms[w.pick(len(w.vms))]
	switch k := w.pick(6); {
	case k == 0:
		w.pauseWriters()
		_ = w.quiescent()
		w.resume()
	case k <= 2: // stop a root, perhaps with a context that ends
		i := w.pick(len(v.cr3s))
		rs := v.roots[i]
		if rs == nil || rs.stopped || v.removed {
			return
		}
		ctx := context.Background()
		if w.pick(2) == 0 {
			ctx = w.ctxEndingSoon(fmt.Sprintf("Stop of VM %d root %d", v.id, i))
		}
		err := w.e.Stop(ctx, rs.r)
		rs.stopped = true
		w.s.note("stopped VM %d root %d: %v", v.id, i, err)
		if err != nil && !errors.Is(err, context.Canceled) {
			w.failf("Stop VM %d root %d: %v", v.id, i, err)
		}
	case k == 3: // start a stopped root again
		i := w.pick(len(v.cr3s))
		if rs := v.roots[i]; v.removed || rs == nil || !rs.stopped {
			return
		}
		w.pauseWriters()
		if w.quiescent() == nil {
			if err := v.start(i); err != nil {
				w.failf("%v", err)
			}
		}
		w.resume()
	case k == 4: // remove the VM
		if v.removed {
			return
		}
		ctx := context.Background()
		if w.pick(3) == 0 {
			ctx = w.ctxEndingSoon(fmt.Sprintf("RemoveVM %d", v.id))
		}
		err := w.e.RemoveVM(ctx, v.id)
		w.s.note("removed VM %d: %v", v.id, err)
		if err != nil {
			if !errors.Is(err, context.Canceled) {
				w.failf("RemoveVM %d: %v", v.id, err)
			}
			// Its roots are stopped (in the background); the VM stays.
			for _, rs := range v.roots {
				if rs != nil {
					rs.stopped = true
				}
			}
			return
		}
		v.removed = true
		for _, rs := range v.roots {
			if rs != nil {
				rs.stopped = true
			}
		}
	case k == 5: // add it again (a new slot generation) and start its roots
		if !v.removed {
			return
		}
		w.pauseWriters()
		if w.quiescent() == nil {
			if err := w.e.AddVM(v.id, v.g.Memory(), v.prot, 0); err != nil && !errors.Is(err, engine.ErrSlotBusy) {
				w.failf("AddVM %d again: %v", v.id, err)
			} else if err == nil {
				v.removed = false
				v.syncer = nil
				for i := range v.cr3s {
					if err := v.start(i); err != nil {
						w.failf("%v", err)
						break
					}
				}
			}
		}
		w.resume()
	}
}

// quiescent syncs the engine (writers paused or done) and checks every
// invariant of a quiescent point.
func (w *world) quiescent() error {
	if err := w.e.Sync(context.Background()); err != nil {
		return w.failf("Sync: %v", err)
	}
	w.stats.Checks++
	w.s.note("quiescent point")
	st := w.e.Stats()
	if st.Submitted != st.Processed+st.Rejected {
		return w.failf("accounting: submitted %d != processed %d + rejected %d", st.Submitted, st.Processed, st.Rejected)
	}
	if st.Tables > int64(rootTabs*len(w.vms)*w.cfg.Roots) {
		return w.failf("%d tables hooked, more than the budgets", st.Tables)
	}
	for _, v := range w.vms {
		want := map[uint64]bool{}
		for i, rs := range v.roots {
			if rs == nil {
				continue
			}
			if rs.stopped {
				if len(rs.m) != 0 || rs.r.Tables() != 0 {
					if d, err := w.e.Dump(context.Background(), rs.r); err == nil {
						for _, t := range d {
							w.s.note("left hooked: L%d gpa=%#x va=%#x present=%d", t.Level, t.GPA, t.VA, t.Present)
						}
					}
					for k, e := range rs.m {
						w.s.note("left mapped: va=%#x size=%#x e=%#x", k.VA, k.Size, e)
					}
					return w.failf("VM %d root %d stopped: %d mappings not reported removed, %d tables hooked", v.id, i, len(rs.m), rs.r.Tables())
				}
				continue
			}
			if rs.r.Stats().Refused > 0 {
				continue // past the budget the monitor does not see the whole tree
			}
			m, ts, err := vasmontest.WalkBoth(v.g.Mem, vasmontest.WalkParams{CR3: v.cr3s[i], Mode: v.mode, Monitored: monitored})
			if err != nil {
				return w.failf("%v", err)
			}
			if d := vasmontest.Diff(m, rs.m, 8); d != "" {
				return w.failf("VM %d (%v) root %d: oracle violated: %s", v.id, v.mode, i, d)
			}
			dump, err := w.e.Dump(context.Background(), rs.r)
			if err != nil {
				return w.failf("Dump: %v", err)
			}
			if len(dump) != len(ts) {
				for _, t := range ts {
					w.s.note("walk reaches L%d gpa=%#x va=%#x", t.Level, t.GPA, t.VA)
				}
				for _, t := range dump {
					w.s.note("hooked L%d gpa=%#x va=%#x", t.Level, t.GPA, t.VA)
				}
				return w.failf("VM %d root %d: %d tables hooked, a walk reaches %d", v.id, i, len(dump), len(ts))
			}
			for _, t := range ts {
				want[t.GPA&^(vasmon.PageSize-1)] = true
			}
		}
		got := v.prot.Pages()
		var wantList []uint64
		for p := range want {
			wantList = append(wantList, p)
		}
		slices.Sort(wantList)
		// Flooded pages are hooked but not protected (vasmon.FloodPolicy).
		var flooded int64
		for _, vs := range w.e.Stats().PerVM { // (after the Dumps, which Sync)
			if vs.ID == v.id && !vs.Removed {
				flooded = vs.Flooded
			}
		}
		missing := 0
		for _, p := range wantList {
			if !slices.Contains(got, p) {
				missing++
			}
		}
		if (len(got)+missing != len(wantList) || int64(missing) != flooded) && !w.anyRefused(v) {
			return w.failf("VM %d: pages protected %#x, hooked %#x, %d flooded", v.id, got, wantList, flooded)
		}
		if len(v.prot.Errors) > 0 {
			return w.failf("VM %d: protection errors %v", v.id, v.prot.Errors)
		}
	}
	return nil
}

func (w *world) anyRefused(v *vmState) bool {
	for _, rs := range v.roots {
		if rs != nil && !rs.stopped && rs.r.Stats().Refused > 0 {
			return true
		}
	}
	return false
}
