package kvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// skipOut receives the loud skip messages (tests of requireMode silence it).
var skipOut io.Writer = os.Stderr

// requireKVM skips the test, loudly, when /dev/kvm cannot be used or this
// host's KVM cannot run 4-level guests, unless VASENGINE_REQUIRE_KVM is set
// (testdata/nested.sh sets it): then it fails.
func requireKVM(t testing.TB) {
	t.Helper()
	requireMode(t, vasmon.Mode4)
}

// requireDevice is requireKVM for tests whose subtests call requireMode:
// it skips (or fails) only when /dev/kvm itself is not usable.
func requireDevice(t testing.TB) {
	t.Helper()
	if err := Probe(vasmon.Mode4); errors.Is(err, ErrNoKVM) {
		requireMode(t, vasmon.Mode4)
	}
}

// requireMode is requireKVM for guests of paging mode m: it skips (or, with
// VASENGINE_REQUIRE_KVM set, fails) with Probe's reason.
func requireMode(t testing.TB, m vasmon.Mode) {
	t.Helper()
	err := Probe(m)
	if err == nil {
		return
	}
	var msg string
	if errors.Is(err, ErrNoKVM) {
		msg = fmt.Sprintf("\n"+
			"*****************************************************************\n"+
			"*** SKIPPED: %s is not usable here (%v).\n"+
			"*** The KVM backend's guests were NOT run by this test.\n"+
			"*** Run backends/kvm/testdata/nested.sh to test it under nested\n"+
			"*** KVM in QEMU TCG, or run on a host with /dev/kvm.\n"+
			"*****************************************************************", Device,
			strings.TrimPrefix(oneLine(err), ErrNoKVM.Error()+": "))
	} else {
		msg = fmt.Sprintf("\n"+
			"*****************************************************************\n"+
			"*** SKIPPED: %v guests cannot run on this host's KVM (%s): %s\n"+
			"*** The KVM backend's %v guests were NOT run by this test.\n"+
			"*** Run backends/kvm/testdata/nested.sh (nested KVM in QEMU TCG)\n"+
			"*** or use a host with a full KVM to run them.\n"+
			"*****************************************************************", m, moduleName(), reason(err, m), m)
	}
	skipLoudly(t, msg)
}

// requireDirty skips (or fails) like requireKVM when the dirty ring is
// missing.
func requireDirty(t testing.TB) {
	t.Helper()
	if err := DirtyRingSupported(); err != nil {
		skipLoudly(t, fmt.Sprintf("\n"+
			"*****************************************************************\n"+
			"*** SKIPPED: dirty mode cannot run here: %s\n"+
			"*** The KVM backend's dirty mode was NOT run by this test.\n"+
			"*****************************************************************", oneLine(err)))
	}
}

func skipLoudly(t testing.TB, msg string) {
	t.Helper()
	if os.Getenv("VASENGINE_REQUIRE_KVM") != "" {
		t.Fatal(msg)
	}
	fmt.Fprintln(skipOut, msg)
	t.Skip(msg)
}

// reason is err's message without ErrModeUnsupported's words and the mode.
func reason(err error, m vasmon.Mode) string {
	return strings.TrimPrefix(oneLine(err), ErrModeUnsupported.Error()+": "+m.String()+" guests: ")
}

func moduleName() string {
	if m := Module(); m != "" {
		return m
	}
	return "module unknown"
}

// guestRun is one test run of VMs on an engine, with the initial map of
// every root taken when it started.
type guestRun struct {
	e    *engine.Engine
	rec  *vasmontest.Recorder
	vms  []*VM
	mu   sync.Mutex
	init map[*vasmon.Root]vasmontest.Map
	all  []*vasmon.Root
}

func newGuestRun(t *testing.T, nvm int, cfg VMConfig, ecfg engine.Config) *guestRun {
	t.Helper()
	e, err := engine.New(ecfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	g := &guestRun{e: e, rec: vasmontest.NewRecorder(), init: make(map[*vasmon.Root]vasmontest.Map)}
	req := backends.Request{Monitored: backends.DefaultMonitored, Callback: g.rec.Callback}
	for i := 0; i < nvm; i++ {
		c := cfg
		c.ID = vasmon.VMID(i + 1)
		c.Seed = cfg.Seed + uint64(i)*1000
		var vm *VM
		c.OnStart = func(r *vasmon.Root) {
			m, err := vasmontest.WalkRoot(vm, r)
			if err != nil {
				t.Error(err)
			}
			g.mu.Lock()
			g.init[r] = m
			g.all = append(g.all, r)
			g.mu.Unlock()
		}
		vm, err = NewVM(e, req, c)
		if err != nil {
			t.Fatal(err)
		}
		g.vms = append(g.vms, vm)
		t.Cleanup(func() { vm.Close(context.Background()) })
	}
	return g
}

// run runs every VM to completion (or until ctx ends) and returns their errors.
func (g *guestRun) run(ctx context.Context) []error {
	errs := make([]error, len(g.vms))
	var wg sync.WaitGroup
	for i, vm := range g.vms {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = vm.Run(ctx) }()
	}
	wg.Wait()
	return errs
}

// checkOracle checks every root ever started: the reported callbacks turn
// its initial map into a full walk of guest memory now (live roots) or into
// the empty map (stopped roots).
func (g *guestRun) checkOracle(t *testing.T) (live, stopped int) {
	t.Helper()
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, r := range g.all {
		m := g.init[r].Clone()
		vasmontest.Apply(m, r.Mode, r.Monitored, g.rec.Peek(r.Ctx))
		want := vasmontest.Map{}
		if !r.Stopped() {
			var err error
			if want, err = vasmontest.WalkRoot(r.VM.Mem, r); err != nil {
				t.Fatal(err)
			}
			live++
		} else {
			stopped++
		}
		if d := vasmontest.Diff(want, m, 10); d != "" {
			t.Fatalf("%s (stopped %v): oracle violated: %s", r.Ctx.(*backends.RootInfo).Name, r.Stopped(), d)
		}
	}
	return live, stopped
}

// checkCounts checks that every trapped write reached the engine and was
// processed, per VM, and the engine's accounting.
func (g *guestRun) checkCounts(t *testing.T) engine.Stats {
	t.Helper()
	st := g.e.Stats()
	if st.Submitted != st.Processed+st.Rejected {
		t.Fatalf("engine lost events: submitted %d != processed %d + rejected %d", st.Submitted, st.Processed, st.Rejected)
	}
	for _, vm := range g.vms {
		vs := vm.Stats()
		var es *engine.VMStats
		for i := range st.PerVM {
			if st.PerVM[i].ID == vm.ID() {
				es = &st.PerVM[i]
			}
		}
		if es == nil {
			t.Fatalf("VM %d unknown to the engine", vm.ID())
		}
		if vm.cfg.Mode == Trap && vs.Traps != vs.Submitted {
			t.Fatalf("VM %d: %d traps but %d events submitted", vm.ID(), vs.Traps, vs.Submitted)
		}
		if es.Submitted != vs.Submitted || es.Events() != vs.Submitted || es.Rejected != 0 {
			t.Fatalf("VM %d: backend submitted %d (%d traps); engine counted %d submitted, %d processed, %d rejected",
				vm.ID(), vs.Submitted, vs.Traps, es.Submitted, es.Events(), es.Rejected)
		}
	}
	return st
}

func (g *guestRun) closeAll(t *testing.T) {
	t.Helper()
	for _, vm := range g.vms {
		if err := vm.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
		if n := vm.protectedPages(); n != 0 {
			t.Fatalf("VM %d: %d pages still write-protected after RemoveVM", vm.ID(), n)
		}
	}
}

func (vm *VM) protectedPages() int {
	if vm.dirty != nil {
		vm.dirty.mu.Lock()
		defer vm.dirty.mu.Unlock()
		return len(vm.dirty.shadows)
	}
	vm.slotMu.Lock()
	defer vm.slotMu.Unlock()
	n := 0
	for _, p := range vm.prot {
		if p {
			n++
		}
	}
	return n
}

var pagingModes = GuestModes()

// iterations is the guest iterations per vCPU of the oracle tests: each
// makes one or two page-table writes and a read-back check.
func iterations() uint64 {
	if testing.Short() {
		return 100
	}
	return 300
}

// TestTrapOracle runs 2 VMs of 2 vCPUs each in every paging mode, the
// guests creating and destroying address spaces and (un)mapping pages, and
// checks the oracle for every root, that every trap was one processed event,
// and that removing the VMs unprotects every page.
func TestTrapOracle(t *testing.T) {
	requireDevice(t)
	for _, m := range pagingModes {
		t.Run(m.String(), func(t *testing.T) {
			requireMode(t, m)
			g := newGuestRun(t, 2, VMConfig{Paging: m, VCPUs: 2, Seed: 7, Iterations: iterations()}, engine.Config{Shards: 2})
			for i, err := range g.run(context.Background()) {
				if err != nil {
					t.Fatalf("VM %d: %v", i+1, err)
				}
			}
			if err := g.e.Sync(context.Background()); err != nil {
				t.Fatal(err)
			}
			live, stopped := g.checkOracle(t)
			st := g.checkCounts(t)
			var total VMStats
			for _, vm := range g.vms {
				total.add(vm.Stats())
			}
			t.Logf("%v: %d roots live, %d stopped; %+v; engine: %d events, %d callbacks, kinds %v",
				m, live, stopped, total, st.Processed, st.Callbacks, st.Kinds)
			t.Logf("windows (asynchronous: counted, not asserted): %d of %d trapped writes linked a table the guest then ran on unhooked",
				total.Windows, total.Traps)
			if total.Checks == 0 || total.Traps == 0 || st.Callbacks == 0 || live == 0 || stopped == 0 ||
				st.Kinds[vasmon.WriteRelevant] == 0 {
				t.Fatalf("the guests exercised too little: %+v, %d live and %d stopped roots, %d callbacks", total, live, stopped, st.Callbacks)
			}
			g.closeAll(t)
		})
	}
}

// TestDirtyOracle is TestTrapOracle in dirty mode.
func TestDirtyOracle(t *testing.T) {
	requireDevice(t)
	requireDirty(t)
	for _, m := range pagingModes {
		t.Run(m.String(), func(t *testing.T) {
			requireMode(t, m)
			g := newGuestRun(t, 2, VMConfig{Paging: m, VCPUs: 2, Seed: 11, Iterations: iterations(), Mode: Dirty}, engine.Config{Shards: 2})
			for i, err := range g.run(context.Background()) {
				if err != nil {
					t.Fatalf("VM %d: %v", i+1, err)
				}
			}
			if err := g.e.Sync(context.Background()); err != nil {
				t.Fatal(err)
			}
			live, stopped := g.checkOracle(t)
			st := g.checkCounts(t)
			var total VMStats
			for _, vm := range g.vms {
				total.add(vm.Stats())
			}
			t.Logf("%v: %d roots live, %d stopped; %+v; engine: %d events, %d callbacks", m, live, stopped, total, st.Processed, st.Callbacks)
			if total.Traps != 0 || total.Submitted == 0 || total.DirtyPages == 0 || st.Callbacks == 0 || live == 0 {
				t.Fatalf("dirty mode saw too little: %+v", total)
			}
			g.closeAll(t)
		})
	}
}

// TestStopInFlight stops running VMs whose guests loop forever, with a
// small engine queue so that events are in flight, removes them, and checks
// that the engine lost nothing.
func TestStopInFlight(t *testing.T) {
	requireKVM(t)
	g := newGuestRun(t, 2, VMConfig{VCPUs: 2, Seed: 3}, engine.Config{Shards: 2, QueueDepth: 16})
	// Stop once the guests are busy: some events submitted (or after a
	// minute, for slow emulated hosts), then a little more.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	go func() {
		for ctx.Err() == nil {
			var n uint64
			for _, vm := range g.vms {
				n += vm.Stats().Submitted
			}
			if n >= 100 {
				time.Sleep(20 * time.Millisecond)
				cancel()
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	for i, err := range g.run(ctx) {
		if err != nil {
			t.Fatalf("VM %d: %v", i+1, err)
		}
	}
	var sub uint64
	for _, vm := range g.vms {
		sub += vm.Stats().Submitted
		if err := vm.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if err := g.e.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	st := g.e.Stats()
	t.Logf("%d events submitted; engine %+v; VM 1: %+v", sub, st.Kinds, g.vms[0].Stats())
	if sub == 0 || st.Submitted != sub {
		t.Fatalf("backend submitted %d events, engine counted %d", sub, st.Submitted)
	}
	if st.Submitted != st.Processed+st.Rejected {
		t.Fatalf("lost events: submitted %d != processed %d + rejected %d", st.Submitted, st.Processed, st.Rejected)
	}
	if st.Roots != 0 || st.VMs != 0 {
		t.Fatalf("%d roots and %d VMs left after RemoveVM", st.Roots, st.VMs)
	}
}

// TestGuestDetectsCorruption makes the host apply 4 KiB leaf writes with the
// wrong frame: the guest's read-back must catch it (so the checks in the
// other tests can fail).
func TestGuestDetectsCorruption(t *testing.T) {
	requireDevice(t)
	for _, m := range pagingModes {
		t.Run(m.String(), func(t *testing.T) {
			requireMode(t, m)
			l, _ := layoutOf(m)
			cfg := VMConfig{Paging: m, VCPUs: 1, Seed: 5, Iterations: 300}
			cfg.corrupt = func(gpa, data uint64) uint64 {
				if data&(vasmon.BitP|vasmon.BitPS) == vasmon.BitP && data&^0xFFF >= smallPhys && data&^0xFFF < largePhys-4096 &&
					gpa%uint64(l.esz) == 0 {
					return data + 4096
				}
				return data
			}
			g := newGuestRun(t, 1, cfg, engine.Config{Shards: 1})
			err := g.run(context.Background())[0]
			if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("guest check failed: code %d", failRead)) {
				t.Fatalf("the guest did not detect a wrong frame: %v", err)
			}
			// The failure shows the control registers: paging on, the mode's bits.
			var cr0, cr3, cr4, efer uint64
			msg := err.Error()
			if i := strings.Index(msg, " cr0="); i < 0 {
				t.Fatalf("no control registers in %q", msg)
			} else if _, err := fmt.Sscanf(msg[i:], " cr0=%v cr3=%v cr4=%v efer=%v", &cr0, &cr3, &cr4, &efer); err != nil {
				t.Fatalf("control registers in %q: %v", msg, err)
			}
			wantCR4 := map[vasmon.Mode]uint64{vasmon.Mode4: cr4PAE, vasmon.ModePAE: cr4PAE, vasmon.Mode32: cr4PSE}[m]
			if cr0&cr0PG == 0 || cr4&wantCR4 == 0 || (m == vasmon.Mode4) != (efer&eferLMA != 0) || cr3 == 0 {
				t.Fatalf("%v guest failure shows cr0=%#x cr3=%#x cr4=%#x efer=%#x", m, cr0, cr3, cr4, efer)
			}
		})
	}
}

// TestRun runs the CLI entry point briefly.
func TestRun(t *testing.T) {
	requireKVM(t)
	e, err := engine.New(engine.Config{Shards: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	sum, err := Run(context.Background(), e, Config{VMs: 2, VCPUs: 2, Iterations: 100, Seed: 1}, backends.Request{})
	if err != nil {
		t.Fatal(err)
	}
	t.Log(sum)
	if len(sum.VMs) != 2 || sum.Total.Traps == 0 || sum.Total.Ops != 2*2*100 {
		t.Fatalf("unexpected summary: %v", sum)
	}
	if st := e.Stats(); st.VMs != 0 || st.Submitted != st.Processed+st.Rejected {
		t.Fatalf("engine after Run: %d VMs, submitted %d processed %d rejected %d", st.VMs, st.Submitted, st.Processed, st.Rejected)
	}
	if _, err := Run(context.Background(), e, Config{}, backends.Request{}); err == nil {
		t.Fatal("Run without Iterations or Duration succeeded")
	}
	// Mixed: every mode this host runs, guest i in mode i mod n.
	var modes []vasmon.Mode
	for _, m := range GuestModes() {
		if Probe(m) == nil {
			modes = append(modes, m)
		}
	}
	sum, err = Run(context.Background(), e, Config{VMs: len(modes) + 1, VCPUs: 1, Iterations: 50, Seed: 2, Modes: modes}, backends.Request{})
	if err != nil {
		t.Fatal(err)
	}
	if got := sum.Paging(); !slices.Equal(got, modes) || sum.VMs[len(modes)].Paging != modes[0] || sum.Total.Checks == 0 {
		t.Fatalf("Run with modes %v: guests ran %v, %+v", modes, got, sum.VMs)
	}
}

// TestRunRefusesUnsupportedMode: Run of a paging mode the host cannot run
// (the probe's answer injected) fails before creating any guest.
func TestRunRefusesUnsupportedMode(t *testing.T) {
	defer SetProbe(func(m vasmon.Mode) error {
		if m == vasmon.Mode32 {
			return fmt.Errorf("%w: %v guests: injected", ErrModeUnsupported, m)
		}
		return nil
	})()
	e, err := engine.New(engine.Config{Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	var added atomic.Int32
	host := addCounter{e, &added}
	for _, cfg := range []Config{
		{Paging: vasmon.Mode32, Iterations: 10},
		{Modes: []vasmon.Mode{vasmon.Mode4, vasmon.Mode32}, VMs: 2, Iterations: 10},
	} {
		sum, err := Run(context.Background(), host, cfg, backends.Request{})
		if !errors.Is(err, ErrModeUnsupported) || len(sum.VMs) != 0 || added.Load() != 0 {
			t.Fatalf("Run(%+v): %v, %d guests, %d added to the host", cfg, err, len(sum.VMs), added.Load())
		}
	}
	if _, err := Run(context.Background(), host, Config{Paging: vasmon.Mode5, Iterations: 10}, backends.Request{}); err == nil ||
		!strings.Contains(err.Error(), "5-level") {
		t.Fatalf("Run of 5-level guests: %v", err)
	}
}

// addCounter counts the VMs added to a host.
type addCounter struct {
	*engine.Engine
	n *atomic.Int32
}

func (h addCounter) AddVM(id vasmon.VMID, mem vasmon.Memory, prot vasmon.Protector, budget int64) error {
	h.n.Add(1)
	return h.Engine.AddVM(id, mem, prot, budget)
}

// TestSyncTrapOracle is TestTrapOracle with VMConfig.Sync: every trapped
// write is submitted synchronously (the engine's stall histogram counts
// exactly the traps, every one allowed: the callback has no verdict), and
// the oracle, the accounting and the unprotection at the end hold.
func TestSyncTrapOracle(t *testing.T) {
	requireDevice(t)
	for _, m := range pagingModes {
		t.Run(m.String(), func(t *testing.T) {
			requireMode(t, m)
			g := newGuestRun(t, 2, VMConfig{Paging: m, VCPUs: 2, Seed: 7, Iterations: iterations(), Sync: true}, engine.Config{Shards: 2})
			for i, err := range g.run(context.Background()) {
				if err != nil {
					t.Fatalf("VM %d: %v", i+1, err)
				}
			}
			if err := g.e.Sync(context.Background()); err != nil {
				t.Fatal(err)
			}
			live, stopped := g.checkOracle(t)
			st := g.checkCounts(t)
			var total VMStats
			for _, vm := range g.vms {
				total.add(vm.Stats())
			}
			if total.Windows != 0 {
				t.Errorf("%d trapped writes linked a table left unprotected when the vCPU went back to the guest", total.Windows)
			}
			if total.Traps == 0 || total.SyncWrites != total.Traps || total.Denied != 0 ||
				st.SyncStall.Count() != total.Traps || st.Allowed != total.Traps || st.Denied != 0 {
				t.Fatalf("%d traps, %d synchronous writes (%d denied); engine: %d stalls, %d allowed, %d denied",
					total.Traps, total.SyncWrites, total.Denied, st.SyncStall.Count(), st.Allowed, st.Denied)
			}
			t.Logf("%v: %d roots live, %d stopped; %d traps, all synchronous; kinds %v; stall p50 %v p99 %v max %v",
				m, live, stopped, total.Traps, st.Kinds, time.Duration(st.SyncStall.Quantile(0.5)),
				time.Duration(st.SyncStall.Quantile(0.99)), time.Duration(st.SyncStall.Max()))
			g.closeAll(t)
		})
	}
}
