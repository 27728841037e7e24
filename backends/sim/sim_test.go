package sim_test

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/sim"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

var request = backends.Request{Monitored: backends.DefaultMonitored}

// oracle checks a run against SEMANTICS.md section 6: each root's map is
// taken by a full walk when its Start returns (its process makes no store
// before OnStart returns); the callbacks recorded for it, applied to that
// map, must give a full walk of memory once the engine is quiescent, and the
// empty map once the root is stopped. The walk at Start relies on the
// engine's Start applying the VM's events submitted before it: the new
// tree may share pages already hooked for other roots (a PAE root slab
// page, a table page freed and reused before its old unhook ran), whose
// shadows are not read again.
//
// Each callback is also checked on its own (SEMANTICS.md section 6, "No
// phantoms", issue #17): a new entry that is a leaf must have been an entry
// of that root, at that VA and size, at some instant (the simulator's ground
// truth, sim.WithTruth), and the host may protect only pages that were
// tables of a root.
type oracle struct {
	t    *testing.T
	rec  *vasmontest.Recorder
	sim  *sim.Sim
	mu   sync.Mutex
	maps map[*backends.RootInfo]vasmontest.Map
	init map[*backends.RootInfo]vasmontest.Map
	hist map[*backends.RootInfo][]vasmontest.Event
	// counts
	started, stopped, checked, mappings int
	leaves, phantoms                    int
}

// callback records a callback, checking that its new leaf existed.
func (o *oracle) callback(ctx any, va, old, new, size uint64) {
	info := ctx.(*backends.RootInfo)
	if l := vasmontest.LevelOf(info.Mode, size); l != 0 && info.Mode.Classify(new, l) == vasmon.KindLeaf {
		ok := o.sim.Existed(info, va, size, new)
		o.mu.Lock()
		o.leaves++
		if !ok {
			if o.phantoms++; o.phantoms <= 5 {
				o.t.Logf("%s (%v): phantom: va=%#x old=%#x new=%#x size=%#x never existed", info.Name, info.Mode, va, old, new, size)
			}
		}
		o.mu.Unlock()
	}
	o.rec.Callback(ctx, va, old, new, size)
}

// run runs s against e with the oracle's callback.
func (o *oracle) run(s *sim.Sim, e *engine.Engine) error {
	o.sim = s
	req := request
	req.Callback = o.callback
	return s.Run(context.Background(), e, req)
}

// phantomFree fails the test if a callback reported a leaf that never
// existed or the host protected a page that never was a table; and, if
// leaves is set, if no new leaf was reported (nothing checked).
func (o *oracle) phantomFree(leaves bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.phantoms != 0 {
		o.t.Errorf("%d phantom callbacks of %d new leaves", o.phantoms, o.leaves)
	}
	if bad := o.sim.BadHooks(); len(bad) != 0 {
		o.t.Errorf("%d pages protected that never were tables, such as %#x", len(bad), bad[0])
	}
	if leaves && o.leaves == 0 {
		o.t.Error("no new leaf reported: nothing checked")
	}
}

func newOracle(t *testing.T) *oracle {
	return &oracle{t: t, rec: vasmontest.NewRecorder(), maps: map[*backends.RootInfo]vasmontest.Map{},
		init: map[*backends.RootInfo]vasmontest.Map{}, hist: map[*backends.RootInfo][]vasmontest.Event{}}
}

// explain logs, for a few mappings where got differs from want, the
// root's initial value and every callback it received at that address.
func (o *oracle) explain(r sim.Root, want, got vasmontest.Map) {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := 0
	for k, v := range got {
		if want[k] == v {
			continue
		}
		if n++; n > 3 {
			break
		}
		o.t.Logf("  va=%#x size=%#x: initial %#x, memory %#x, got %#x; callbacks:", k.VA, k.Size, o.init[r.Info][k], want[k], v)
		for _, e := range o.hist[r.Info] {
			if e.VA == k.VA {
				o.t.Logf("    %v", e)
			}
		}
	}
}

func (o *oracle) onStart(r sim.Root) {
	m, err := vasmontest.WalkRoot(r.Mem, r.Root)
	if err != nil {
		o.t.Errorf("%s: walk at start: %v", r.Info.Name, err)
		return
	}
	o.mu.Lock()
	o.maps[r.Info] = m
	o.init[r.Info] = m.Clone()
	o.started++
	o.mu.Unlock()
}

// apply applies the callbacks recorded so far for r to its map.
func (o *oracle) apply(r sim.Root) vasmontest.Map {
	o.mu.Lock()
	defer o.mu.Unlock()
	m := o.maps[r.Info]
	if m == nil {
		o.t.Errorf("%s: no map taken at start", r.Info.Name)
		return vasmontest.Map{}
	}
	evs := o.rec.Take(r.Info)
	o.hist[r.Info] = append(o.hist[r.Info], evs...)
	vasmontest.Apply(m, r.Info.Mode, r.Root.Monitored, evs)
	return m
}

func (o *oracle) onStop(r sim.Root) {
	if m := o.apply(r); len(m) != 0 {
		o.t.Errorf("%s (%v): %d mappings not reported removed by Stop", r.Info.Name, r.Info.Mode, len(m))
		o.explain(r, vasmontest.Map{}, m)
	}
	if n := r.Root.Tables(); n != 0 {
		o.t.Errorf("%s: %d tables still hooked after Stop", r.Info.Name, n)
	}
	o.mu.Lock()
	delete(o.maps, r.Info)
	o.stopped++
	o.mu.Unlock()
}

// check runs once the vCPUs have stopped: every live root's map must equal a
// full walk of guest memory.
func (o *oracle) check(e *engine.Engine, roots []sim.Root) {
	if err := e.Sync(context.Background()); err != nil {
		o.t.Fatal(err)
	}
	for _, r := range roots {
		m := o.apply(r)
		want, err := vasmontest.WalkRoot(r.Mem, r.Root)
		if err != nil {
			o.t.Fatal(err)
		}
		if d := vasmontest.Diff(want, m, 8); d != "" {
			o.t.Errorf("%s (%v): oracle violated: %s", r.Info.Name, r.Info.Mode, d)
			o.explain(r, want, m)
		}
		o.checked++
		o.mappings += len(want)
	}
}

// TestOracle runs every profile on four VMs (one per paging mode, two vCPUs
// each) through a two-shard engine and checks every root against the
// oracle, every stopped root for a complete removal, the protection left
// behind and the accounting.
func TestOracle(t *testing.T) {
	events := uint64(40000)
	if testing.Short() {
		events = 4000
	}
	for _, prof := range sim.Profiles() {
		t.Run(prof, func(t *testing.T) {
			e, err := engine.New(engine.Config{Shards: 2, NoPin: true})
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			o := newOracle(t)
			var s *sim.Sim
			cfg := sim.Config{VMs: 4, VCPUs: 2, Profile: prof, Seed: 42, Processes: 3, RAM: 256 << 20,
				MaxEvents: events, OnStart: o.onStart, OnStop: o.onStop,
				OnIdle: func() { o.check(e, s.Roots()) }}
			if prof == "idle" {
				cfg.MaxEvents, cfg.Duration = 0, 300*time.Millisecond
			}
			if s, err = sim.New(sim.WithTruth(cfg)); err != nil {
				t.Fatal(err)
			}
			if err := o.run(s, e); err != nil {
				t.Fatal(err)
			}
			o.phantomFree(prof != "idle") // idle runs for a time, in which a loaded machine may fault nothing in
			if n := s.ProtectedPages(); n != 0 {
				t.Errorf("%d pages still protected after Run", n)
			}
			if err := e.Sync(context.Background()); err != nil {
				t.Fatal(err)
			}
			es, st := e.Stats(), s.Stats()
			if es.Submitted != es.Processed+es.Rejected {
				t.Errorf("engine lost events: submitted %d != processed %d + rejected %d", es.Submitted, es.Processed, es.Rejected)
			}
			if st.Submitted != es.Submitted || st.Rejected != 0 || st.Submitted != st.TotalTrapped() {
				t.Errorf("sim submitted %d (rejected %d, trapped %d), engine got %d", st.Submitted, st.Rejected, st.TotalTrapped(), es.Submitted)
			}
			if st.RootsStarted != uint64(o.started) || st.RootsStopped != uint64(o.stopped) || o.started != o.stopped ||
				st.StartErrors+st.StopErrors+st.OOM != 0 || len(o.maps) != 0 {
				t.Errorf("roots: sim started %d stopped %d, oracle saw %d and %d, %d left; errors %d/%d, OOM %d",
					st.RootsStarted, st.RootsStopped, o.started, o.stopped, len(o.maps), st.StartErrors, st.StopErrors, st.OOM)
			}
			if es.VMs != 0 || es.Roots != 0 || es.Tables != 0 {
				t.Errorf("engine still holds %d VMs, %d roots, %d tables", es.VMs, es.Roots, es.Tables)
			}
			if o.checked == 0 || es.Callbacks == 0 {
				t.Errorf("nothing checked: %d roots, %d callbacks", o.checked, es.Callbacks)
			}
			t.Logf("%d events (%d writes), kinds %v, %d callbacks (%d new leaves checked); %d roots started, %d checked live with %d mappings; %d freed tables reused as data; %d stale reads",
				es.Processed, st.TotalWrites(), es.Kinds, es.Callbacks, o.leaves, o.started, o.checked, o.mappings,
				st.Ops[sim.OpReuse], es.StaleReads)
		})
	}
}

// TestPhantomsUnversioned shows that TestOracle's check of each callback can
// fail: the same guests, which reuse freed table pages at once (as data,
// and as tables elsewhere), with their memory given to the engine without
// its version words. The engine then cannot prove its reads against the
// guest's stores (a best effort, vasmon's "No phantoms"): a table read after
// the guest unlinked, freed and reused its page, and found linked by a walk
// made at another instant than the read, is reported at its old place,
// with entries that never were there. Each profile runs until one of them
// shows such a callback, or a page protected that never was a table.
func TestPhantomsUnversioned(t *testing.T) {
	events := uint64(100000)
	if testing.Short() {
		events = 40000
	}
	found := 0
	for _, prof := range []string{"web", "linux", "windows", "build", "forkstorm"} {
		e, err := engine.New(engine.Config{Shards: 2, NoPin: true})
		if err != nil {
			t.Fatal(err)
		}
		o := newOracle(t)
		cfg := sim.Config{VMs: 4, VCPUs: 2, Profile: prof, Seed: 42, Processes: 3, RAM: 256 << 20, MaxEvents: events}
		s, err := sim.New(sim.Unversioned(sim.WithTruth(cfg)))
		if err != nil {
			t.Fatal(err)
		}
		if err := o.run(s, e); err != nil {
			t.Fatal(err)
		}
		_ = e.Close()
		bad := len(s.BadHooks())
		t.Logf("%s, unversioned: %d phantom callbacks of %d new leaves, %d pages protected that never were tables",
			prof, o.phantoms, o.leaves, bad)
		if found = o.phantoms + bad; found > 0 {
			break
		}
	}
	if found == 0 {
		t.Error("no phantom without versions: the check of each callback would not see one with them either")
	}
}

// TestDeterminism: with one vCPU per VM and a host whose protection is
// deterministic (every page protected), the same seed gives the same event
// stream and the same counts; another seed another stream.
func TestDeterminism(t *testing.T) {
	events := uint64(40000)
	if testing.Short() {
		events = 10000
	}
	run := func(prof string, seed uint64) (map[vasmon.VMID]uint64, sim.Stats) {
		s, err := sim.New(sim.Config{VMs: 4, Profile: prof, Seed: seed, RAM: 256 << 20, MaxEvents: events})
		if err != nil {
			t.Fatal(err)
		}
		h := newNullHost(true)
		if err := s.Run(context.Background(), h, request); err != nil {
			t.Fatal(err)
		}
		return h.hashes(), s.Stats()
	}
	for _, prof := range []string{"web", "build", "forkstorm", "windows"} {
		h1, s1 := run(prof, 7)
		h2, s2 := run(prof, 7)
		h3, _ := run(prof, 8)
		if !reflect.DeepEqual(h1, h2) {
			t.Errorf("%s: same seed, different event streams: %x vs %x", prof, h1, h2)
		}
		if s1.Writes != s2.Writes || s1.Ops != s2.Ops || s1.Trapped != s2.Trapped {
			t.Errorf("%s: same seed, different counts:\n%+v\n%+v", prof, s1, s2)
		}
		for vm, h := range h1 {
			if h3[vm] == h {
				t.Errorf("%s: VM %d: seeds 7 and 8 gave the same stream", prof, vm)
			}
		}
	}
}

// TestProfileMix checks what the profiles promise: windows's trapped writes
// are mostly irrelevant to the monitor, idle is far slower than the rest.
func TestProfileMix(t *testing.T) {
	t.Run("windows", func(t *testing.T) {
		e, err := engine.New(engine.Config{Shards: 2, NoPin: true})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		// Paced, so that the engine keeps up: when it lags, tables it hooks
		// late turn trapped writes into untracked ones.
		s, err := sim.New(sim.Config{VMs: 4, VCPUs: 2, Profile: "windows", Seed: 3, RAM: 256 << 20,
			Rate: 10000, Duration: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Run(context.Background(), e, request); err != nil {
			t.Fatal(err)
		}
		if err := e.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
		// Of the tracked events (those that found a hooked table): how
		// many are untracked depends on how far the engine lags, which
		// load moves (writes already in a read of their page are
		// untracked), not on the profile.
		st := e.Stats()
		tracked := st.Processed - st.Kinds[vasmon.WriteUntracked]
		frac := float64(st.Kinds[vasmon.WriteIrrelevant]) / float64(tracked)
		t.Logf("windows: %d events, kinds %v: %.1f%% of the tracked ones irrelevant", st.Processed, st.Kinds, 100*frac)
		if tracked < 1000 || frac < 0.80 {
			t.Errorf("windows: %.1f%% of %d tracked events irrelevant, want at least 80%%", 100*frac, tracked)
		}
	})
	t.Run("idle", func(t *testing.T) {
		// events per second per VM
		rate := func(prof string) float64 {
			s, err := sim.New(sim.Config{VMs: 2, Profile: prof, Seed: 1, RAM: 256 << 20, Duration: 300 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Run(context.Background(), newNullHost(true), request); err != nil {
				t.Fatal(err)
			}
			st := s.Stats()
			return float64(st.TotalTrapped()-st.Trapped[sim.OpSetup]) / st.Running.Seconds() / 2
		}
		idle, web := rate("idle"), rate("web")
		t.Logf("per VM: idle %.0f events/s, web %.0f events/s", idle, web)
		// Half of idle's draws halt for 1 ms: about 1000 events/s per vCPU
		// at most, however fast the host. The ratio is loose: a loaded
		// machine (or the race detector) slows web, not idle.
		if idle > 3000 || idle*4 > web {
			t.Errorf("idle (%.0f events/s) is not much slower than web (%.0f events/s)", idle, web)
		}
	})
}

// TestRateAndBurst checks the pacing: a rated run stays near its rate, and
// a burst pattern idles the vCPUs during its off periods.
func TestRateAndBurst(t *testing.T) {
	run := func(rate float64, burst sim.Burst) float64 {
		// windows: operations of one store mostly, so little overshoot
		s, err := sim.New(sim.Config{VMs: 2, VCPUs: 2, Profile: "windows", Seed: 1, RAM: 256 << 20,
			Rate: rate, Burst: burst, Duration: 400 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Run(context.Background(), newNullHost(true), request); err != nil {
			t.Fatal(err)
		}
		st := s.Stats()
		return float64(st.TotalTrapped()-st.Trapped[sim.OpSetup]) / st.Running.Seconds() / 2
	}
	got := run(5000, sim.Burst{})
	t.Logf("rate 5000/s per VM: %.0f/s", got)
	if got > 5000*1.2 || got < 5000*0.5 {
		t.Errorf("rate 5000 events/s per VM: got %.0f", got)
	}
	// Rated, so that the comparison does not depend on the machine's speed.
	bursty := run(5000, sim.Burst{On: 20 * time.Millisecond, Off: 80 * time.Millisecond})
	t.Logf("rate 5000/s per VM, 20ms on/80ms off: %.0f/s", bursty)
	if bursty > got/2 || bursty == 0 {
		t.Errorf("a 20%% duty cycle gave %.0f events/s against %.0f steady", bursty, got)
	}
}

func TestConfig(t *testing.T) {
	if got := sim.Profiles(); !reflect.DeepEqual(got, []string{"idle", "web", "build", "forkstorm", "windows", "linux"}) {
		t.Errorf("Profiles() = %v", got)
	}
	for _, tc := range []struct {
		cfg  sim.Config
		want string
	}{
		{sim.Config{Profile: "nope"}, `unknown profile "nope"`},
		{sim.Config{VMs: -1}, "negative"},
		{sim.Config{RAM: 1 << 20}, "at least 64 MiB"},
		{sim.Config{Mode: vasmon.Mode32, RAM: 8 << 30}, "at most 4 GiB"},
		{sim.Config{Mode: 9}, "invalid paging mode"},
	} {
		if _, err := sim.New(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want an error containing %q", tc.cfg, err, tc.want)
		}
	}
	if b, err := sim.ParseBurst("100ms/900ms"); err != nil || b != (sim.Burst{On: 100 * time.Millisecond, Off: 900 * time.Millisecond}) {
		t.Errorf("ParseBurst = %v, %v", b, err)
	}
	for _, bad := range []string{"100ms", "x/1s", "0s/1s"} {
		if _, err := sim.ParseBurst(bad); err == nil {
			t.Errorf("ParseBurst(%q) succeeded", bad)
		}
	}
	s, err := sim.New(sim.Config{VMs: 1, RAM: 128 << 20, MaxEvents: 100})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Run(context.Background(), newNullHost(true), request); err != nil {
		t.Fatal(err)
	}
	if err := s.Run(context.Background(), newNullHost(true), request); err == nil {
		t.Error("a second Run succeeded")
	}
}

// TestClosedEngine: a run against an engine that closes under it ends with
// the engine's error instead of hanging.
func TestClosedEngine(t *testing.T) {
	e, err := engine.New(engine.Config{Shards: 2, NoPin: true})
	if err != nil {
		t.Fatal(err)
	}
	s, err := sim.New(sim.Config{VMs: 2, VCPUs: 2, RAM: 256 << 20, Profile: "build",
		OnIdle: func() {}})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(100 * time.Millisecond)
		_ = e.Close()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err = s.Run(ctx, e, request)
	if !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Run against a closed engine: %v", err)
	}
}
