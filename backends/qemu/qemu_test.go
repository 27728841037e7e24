package qemu_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/qemu"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// skipReason is why the QEMU tests cannot run here ("" if they can).
var skipReason string

// TestMain builds the QEMU artifacts with scripts/qemu-setup.sh when they
// are missing and the machine allows it (root for apt-get, or everything
// already installed). Otherwise, or with VASENGINE_QEMU=0, the tests skip,
// loudly; with VASENGINE_REQUIRE_QEMU set they fail instead.
func TestMain(m *testing.M) {
	skipReason = prepare()
	if skipReason != "" {
		fmt.Fprintf(os.Stderr, "\n*** backends/qemu: QEMU TESTS SKIPPED: %s ***\n\n", skipReason)
		if os.Getenv("VASENGINE_REQUIRE_QEMU") != "" {
			fmt.Fprintln(os.Stderr, "VASENGINE_REQUIRE_QEMU is set: failing")
			os.Exit(1)
		}
	}
	os.Exit(m.Run())
}

func prepare() string {
	if os.Getenv("VASENGINE_QEMU") == "0" {
		return "VASENGINE_QEMU=0"
	}
	dir, err := qemu.DefaultDir()
	if err != nil {
		return err.Error()
	}
	ready := func() error {
		if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
			return err
		}
		_, _, _, err := qemu.Artifacts(dir)
		return err
	}
	if st, err := os.Stat("/dev/shm"); err != nil || !st.IsDir() {
		return "no /dev/shm for the shared guest RAM"
	}
	// The script is idempotent and quick when everything is up to date; it
	// rebuilds the initramfs and the plugin when their sources changed.
	script, _ := filepath.Abs(filepath.Join("..", "..", "scripts", "qemu-setup.sh")) // the test runs in backends/qemu
	if _, err := os.Stat(script); err != nil {
		if err := ready(); err != nil {
			return fmt.Sprintf("%v, and no setup script at %s", err, script)
		}
		return ""
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil && os.Geteuid() != 0 {
		return "qemu-system-x86_64 is not installed and the tests are not root to apt-get it"
	}
	cmd := exec.Command("sh", script, dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Sprintf("%s failed: %v\n%s", script, err, out)
	}
	if err := ready(); err != nil {
		return fmt.Sprintf("setup ran but: %v", err)
	}
	return ""
}

func needQEMU(t *testing.T) {
	t.Helper()
	if skipReason != "" {
		t.Skipf("QEMU TESTS SKIPPED: %s", skipReason)
	}
}

type tracked struct {
	m    vasmontest.Map
	root *vasmon.Root
}

// TestLinuxForkOracle boots a real Linux guest running a fork/exec and
// mmap-heavy workload and, at several checkpoints, pauses it and checks
// every monitored root against a full walk of guest memory: the callbacks
// reported since the previous checkpoint, applied to the previous walk,
// must give the new walk. Roots stopped in between must have reported every
// mapping removed. At the end the guest is closed (every root stopped).
//
// Every callback must also be true on its own (SEMANTICS.md section 6, "No
// phantoms"): none may report a present entry that Linux cannot have written
// (qemu.CheckEntry: a frame outside guest RAM, reserved bits set).
//
// The engine's shard count is VASENGINE_QEMU_SHARDS (default 2), the
// guest's vCPUs VASENGINE_QEMU_VCPUS (default 1). VASENGINE_QEMU_UNVERSIONED=1
// gives the engine guest RAM without its version words, so that it cannot
// prove its reads (the behaviour before issue 17), to see what the proofs
// prevent: phantoms then depend on the guest reusing a freed table page
// before the engine reads it, which is rare with this workload (none in the
// run made when this was written); TestCheckEntry shows the check finds
// the phantoms issue 17 saw.
//
// Stores into a table after it was linked and before the engine hooked it
// (windows, GuestStats.Windows) are counted and logged: asynchronous
// delivery has them (TestLinuxSync shows synchronous delivery has none).
func TestLinuxForkOracle(t *testing.T) {
	needQEMU(t)
	if os.Getenv("VASENGINE_QEMU_UNVERSIONED") == "1" {
		t.Log("VASENGINE_QEMU_UNVERSIONED=1: guest RAM is given to the engine without version words")
		defer qemu.SetUnversioned(qemu.SetUnversioned(true))
	}
	checkpoints := 5
	if testing.Short() {
		checkpoints = 3
	}
	s := runOracle(t, oracleRun{cfg: qemu.Config{Workload: "mixed", Jobs: 2, Windows: true}, checkpoints: checkpoints})
	t.Logf("asynchronous delivery: %d windows (stores into a linked table before its hook) of %d window records", s.Windows, s.Plugin.WindowRecs)
}

// oracleRun is what runOracle runs.
type oracleRun struct {
	cfg         qemu.Config
	checkpoints int
	// verdict, if set, is the roots' verdict callback (it must record
	// what it allows in rec itself).
	verdict func(rec *vasmontest.Recorder, g *atomic.Pointer[qemu.Guest]) shard.VerdictCallback
	// last, if set, runs after the final checkpoint, before Close.
	last func(ctx context.Context, t *testing.T, g *qemu.Guest)
}

// runOracle runs TestLinuxForkOracle's checks on a guest of o.cfg (VM 7;
// the vCPUs VASENGINE_QEMU_VCPUS, default 1) and returns its statistics
// after Close.
func runOracle(t *testing.T, o oracleRun) qemu.GuestStats {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	e, err := engine.New(engine.Config{Shards: envInt("VASENGINE_QEMU_SHARDS", 2), NoPin: true})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	rec := vasmontest.NewRecorder()
	req := backends.Request{Monitored: backends.DefaultMonitored, Callback: rec.Callback}
	var gp atomic.Pointer[qemu.Guest]
	if o.verdict != nil {
		req.Options.Verdict = o.verdict(rec, &gp)
	}
	cfg := o.cfg
	cfg.VCPUs = envInt("VASENGINE_QEMU_VCPUS", 1)
	con := &consoleTail{}
	cfg.Console = con
	g, err := qemu.StartGuest(ctx, e, 7, cfg, req)
	if err != nil {
		t.Fatal(err)
	}
	gp.Store(g)
	defer g.Close(context.Background())

	waitWorkload(ctx, t, g, con)

	base := map[*backends.RootInfo]*tracked{}
	var compared, applied, retired, mappings int
	check := func(when string) {
		t.Helper()
		if err := g.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		if err := e.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		seen := map[*backends.RootInfo]bool{}
		for _, r := range g.Roots() {
			seen[r.Info] = true
			evs := rec.Take(r.Info)
			want, err := vasmontest.WalkRoot(g.Memory(), r.Root)
			if err != nil {
				t.Fatal(err)
			}
			dump, _ := e.Dump(context.Background(), r.Root)
			if d := tablesDiff(g.Memory(), r.Root, dump); d != "" {
				t.Errorf("%s: root %s: hooked tables differ from memory: %s", when, r.Info.Name, d)
			}
			tr := base[r.Info]
			if tr == nil {
				base[r.Info] = &tracked{m: want, root: r.Root}
				continue
			}
			vasmontest.Apply(tr.m, r.Root.Mode, r.Root.Monitored, evs)
			if d := vasmontest.Diff(want, tr.m, 10); d != "" {
				t.Errorf("%s: root %s: oracle violated after %d callbacks: %s", when, r.Info.Name, len(evs), d)
			}
			tr.m = want
			compared++
			applied += len(evs)
			mappings += len(want)
		}
		for info, tr := range base {
			if seen[info] {
				continue
			}
			evs := rec.Take(info)
			vasmontest.Apply(tr.m, info.Mode, backends.DefaultMonitored, evs)
			if len(tr.m) != 0 {
				t.Errorf("%s: stopped root %s: %d mappings not reported removed:%s", when, info.Name, len(tr.m), leftovers(tr.m, evs))
			}
			delete(base, info)
			retired++
			applied += len(evs)
		}
		st := e.Stats()
		if st.Submitted != st.Processed+st.Rejected || st.Rejected != 0 {
			t.Errorf("%s: engine accounting: submitted %d, processed %d, rejected %d", when, st.Submitted, st.Processed, st.Rejected)
		}
		// The plugin delivers each store once, each record with a stamp of
		// its own: the engine must find no duplicate.
		if d := st.Kinds[vasmon.WriteDuplicate]; d != 0 {
			t.Errorf("%s: the engine dropped %d events as duplicates", when, d)
		}
		c := g.Counters()
		t.Logf("%s: %d roots live, plugin %d stores, %d records, %d waits, %d drops, %d holds given up; engine: %d flooded pages; roots %+v",
			when, len(seen), c.Stores, c.Records, c.Waits, c.Drops, c.GiveUps, st.Floods, g.Stats().Roots)
		if c.Drops != 0 || c.GiveUps != 0 {
			t.Errorf("%s: the plugin dropped %d records, gave up %d holds", when, c.Drops, c.GiveUps)
		}
	}

	checkpoints := o.checkpoints
	for i := 0; i < checkpoints; i++ {
		// Between checkpoints the guest makes some 20,000 page-table
		// stores (or what o.step waits for).
		from := g.Counters().Records
		for g.Counters().Records < from+20000 {
			select {
			case <-g.Exited():
				t.Fatalf("the guest exited: %v; console ends:\n%s", g.Stats().Exit, con)
			case <-ctx.Done():
				t.Fatalf("checkpoint %d: the guest made %d page-table stores since the last one", i, g.Counters().Records-from)
			case <-time.After(20 * time.Millisecond):
			}
		}
		check(fmt.Sprintf("checkpoint %d", i))
		if err := g.Resume(); err != nil {
			t.Fatal(err)
		}
	}
	check("final")
	if o.last != nil {
		o.last(ctx, t, g)
	}
	if err := g.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for info, tr := range base { // Close stopped every root
		evs := rec.Take(info)
		vasmontest.Apply(tr.m, info.Mode, backends.DefaultMonitored, evs)
		if len(tr.m) != 0 {
			t.Errorf("after Close: root %s: %d mappings not reported removed (%d callbacks since the last checkpoint; stopped %v, %d tables, %+v):%s",
				info.Name, len(tr.m), len(evs), tr.root.Stopped(), tr.root.Tables(), tr.root.Stats(), leftovers(tr.m, evs))
		}
		retired++
	}
	s := g.Stats()
	t.Logf("compared %d root checkpoints (%d mappings), %d roots retired, %d callbacks applied; %+v", compared, mappings, retired, applied, s)
	checkPhantoms(t, g, s)
	// The checks above must have had something to check.
	if compared < checkpoints || retired < 3 || applied < 1000 || s.Plugin.Records < 10000 {
		t.Errorf("too little was checked: %d root comparisons, %d roots retired, %d callbacks, %d records",
			compared, retired, applied, s.Plugin.Records)
	}
	if s.Roots.StoppedKernel+s.Roots.StoppedEmpty == 0 {
		t.Errorf("no root was seen to die: %+v", s.Roots)
	}
	return s
}

// checkPhantoms logs g's phantom callbacks and fails t if there are any.
func checkPhantoms(t *testing.T, g *qemu.Guest, s qemu.GuestStats) {
	t.Helper()
	t.Logf("VM %d: %d phantom callbacks (present entries Linux cannot have written) of %d callbacks with a present entry", s.VM, s.Phantoms, s.Present)
	if s.Phantoms != 0 {
		var b strings.Builder
		for _, p := range g.Phantoms() {
			fmt.Fprintf(&b, "\n  %v", p)
		}
		t.Errorf("VM %d: %d phantom callbacks; the first:%s", s.VM, s.Phantoms, b.String())
	}
}

// tablesDiff compares the tables the engine holds for r with the tables
// reachable from r's root in memory (user half; levels 4..2 point to tables
// unless PS is set).
func tablesDiff(mem vasmon.Memory, r *vasmon.Root, dump []vasmon.TableInfo) string {
	type key struct {
		gpa   uint64
		level int
		va    uint64
	}
	want := map[key]bool{}
	var walk func(gpa uint64, level int, va uint64)
	walk = func(gpa uint64, level int, va uint64) {
		want[key{gpa, level, va}] = true
		if level == 1 {
			return
		}
		n := 512
		if level == r.Mode.Levels() {
			n = 256
		}
		var buf [4096]byte
		if mem.Read(gpa, buf[:]) != nil {
			return
		}
		for i := 0; i < n; i++ {
			e := binary.LittleEndian.Uint64(buf[8*i:])
			if r.Mode.Classify(e, level) == vasmon.KindTable && mem.InRAM(r.Mode.TableAddr(e), 4096) {
				walk(r.Mode.TableAddr(e), level-1, r.Mode.EntryVA(va, level, i))
			}
		}
	}
	walk(r.RootGPA(), r.Mode.Levels(), 0)
	got := map[key]bool{}
	for _, ti := range dump {
		got[key{ti.GPA, ti.Level, ti.VA}] = true
	}
	var out []string
	for k := range want {
		if !got[k] {
			out = append(out, fmt.Sprintf("missing L%d %#x va=%#x", k.level, k.gpa, k.va))
		}
	}
	for k := range got {
		if !want[k] {
			out = append(out, fmt.Sprintf("extra L%d %#x va=%#x", k.level, k.gpa, k.va))
		}
	}
	if len(out) > 5 {
		out = append(out[:5], fmt.Sprintf("... %d in all", len(out)))
	}
	return strings.Join(out, "; ")
}

// leftovers describes a few mappings left in m and the callbacks at their VAs.
func leftovers(m vasmontest.Map, evs []vasmontest.Event) string {
	var b strings.Builder
	n := 0
	for k, v := range m {
		if n++; n > 3 {
			break
		}
		fmt.Fprintf(&b, "\n  left va=%#x size=%#x entry=%#x; callbacks there:", k.VA, k.Size, v)
		for _, e := range evs {
			if e.VA == k.VA {
				fmt.Fprintf(&b, "\n    %v", e)
			}
		}
	}
	return b.String()
}

// TestRunTwoGuests runs two guests at once through Run until their
// workloads end, and checks that each was monitored on its own VM and that
// Run stopped every root and removed both VMs.
func TestRunTwoGuests(t *testing.T) {
	needQEMU(t)
	if testing.Short() {
		t.Skip("-short: one QEMU guest test is enough")
	}
	e, err := engine.New(engine.Config{Shards: 2, NoPin: true})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	var mu sync.Mutex
	calls := map[vasmon.VMID]int{}
	req := backends.Request{Monitored: backends.DefaultMonitored, Callback: func(ctx any, va, old, new, size uint64) {
		mu.Lock()
		calls[ctx.(*backends.RootInfo).VM]++
		mu.Unlock()
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	sum, err := qemu.Run(ctx, e, qemu.Config{Guests: 2, Workload: "fork", Rounds: 15, FirstVM: 10, Duration: 60 * time.Second}, req)
	if err != nil {
		t.Fatal(err)
	}
	if len(sum.Guests) != 2 {
		t.Fatalf("%d guests in the summary", len(sum.Guests))
	}
	for _, g := range sum.Guests {
		t.Logf("VM %d: %+v", g.VM, g)
		if g.Workload == 0 {
			t.Errorf("VM %d: the workload did not finish", g.VM)
		}
		if g.Roots.Births == 0 || g.Roots.Started < 10 || g.Submitted == 0 || calls[g.VM] == 0 {
			t.Errorf("VM %d: too little monitored: %d births, %d roots, %d events, %d callbacks",
				g.VM, g.Roots.Births, g.Roots.Started, g.Submitted, calls[g.VM])
		}
		if g.Plugin.Drops != 0 || g.Rejected != 0 {
			t.Errorf("VM %d: %d drops, %d events rejected", g.VM, g.Plugin.Drops, g.Rejected)
		}
		t.Logf("VM %d: %d phantom callbacks (present entries Linux cannot have written) of %d callbacks with a present entry", g.VM, g.Phantoms, g.Present)
		if g.Phantoms != 0 {
			t.Errorf("VM %d: %d phantom callbacks, the first: %v", g.VM, g.Phantoms, g.FirstPhantoms)
		}
	}
	if err := e.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	st := e.Stats()
	if st.VMs != 0 || st.Roots != 0 || st.Tables != 0 {
		t.Errorf("after Run: %d VMs, %d roots, %d tables left in the engine", st.VMs, st.Roots, st.Tables)
	}
	if st.Submitted != st.Processed+st.Rejected {
		t.Errorf("engine accounting: submitted %d, processed %d, rejected %d", st.Submitted, st.Processed, st.Rejected)
	}
}

// waitWorkload waits until g's workload has started; it fails t if the
// guest exits or ctx ends first (showing the console's end, if given).
func waitWorkload(ctx context.Context, t *testing.T, g *qemu.Guest, console fmt.Stringer) {
	t.Helper()
	for !g.WorkloadStarted() {
		select {
		case <-g.Exited():
			if console != nil {
				t.Fatalf("guest exited before its workload started: %v; console ends:\n%s", g.Stats().Exit, console)
			}
			t.Fatalf("guest exited before its workload started: %v", g.Stats().Exit)
		case <-ctx.Done():
			if console != nil {
				t.Fatalf("workload did not start; console ends:\n%s", console)
			}
			t.Fatal("workload did not start")
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// TestLinuxSync runs TestLinuxForkOracle's checks with synchronous delivery
// (Config.Sync, issue 14): the plugin holds each vCPU that stores into a
// page table until the engine is done with the store. Linux links a new
// table and writes into it at once; every such store must be trapped and
// reported: no store may reach a table between its link and its hook (0
// windows; see syncWindowsMax). A verdict callback denies the first new 4 KiB user mappings of
// the workload (an entry going from 0 to present: the process faults again
// and maps another page; the first stays allocated, which the test guest
// can afford): each must be reverted in guest memory by
// the time the engine reports it reverted (checked then, while the vCPU is
// held), and the oracle must hold with both callbacks applied.
func TestLinuxSync(t *testing.T) {
	needQEMU(t)
	const syncWindowsMax = 8
	const denyMax = 8
	type key struct {
		info *backends.RootInfo
		va   uint64
	}
	var mu sync.Mutex
	denied := map[key]uint64{} // denied new entries whose revert is not reported yet
	var nDenied, nReverted int
	var noDeny bool // from the end of the synchronous part on
	var bad []string
	verdict := func(rec *vasmontest.Recorder, gp *atomic.Pointer[qemu.Guest]) shard.VerdictCallback {
		return func(ctx any, va, old, new, size uint64) shard.Verdict {
			rec.Callback(ctx, va, old, new, size)
			info := ctx.(*backends.RootInfo)
			k := key{info, va}
			mu.Lock()
			defer mu.Unlock()
			if x, ok := denied[k]; ok {
				delete(denied, k)
				nReverted++
				if e := leafAt(gp.Load().Memory(), info, va); old != x || new != 0 || e != 0 {
					bad = append(bad, fmt.Sprintf("%s va=%#x: denied 0 -> %#x, then reported %#x -> %#x with %#x in guest memory", info.Name, va, x, old, new, e))
				}
				return shard.Allow
			}
			// Only user mappings of the workload's processes: the kernel
			// maps pages of its own in user address spaces too (text_poke,
			// without US), and cannot take a refusal.
			if g := gp.Load(); nDenied < denyMax && !noDeny && g != nil && g.WorkloadStarted() && size == vasmon.PageSize &&
				old == 0 && new&(vasmon.BitP|vasmon.BitUS) == vasmon.BitP|vasmon.BitUS {
				nDenied++
				denied[k] = new
				return shard.Deny
			}
			return shard.Allow
		}
	}
	// At the end, the Go side stops answering and its process is found
	// gone (the plugin is shown a dead PID): the plugin must let the vCPUs
	// go on, and hold none any more.
	var dead qemu.Counters
	var synced qemu.GuestStats
	last := func(ctx context.Context, t *testing.T, g *qemu.Guest) {
		synced = g.Stats()
		mu.Lock()
		noDeny = true
		mu.Unlock()
		if err := g.Resume(); err != nil {
			t.Fatal(err)
		}
		gone := exec.Command("true")
		if err := gone.Run(); err != nil {
			t.Fatal(err)
		}
		g.Mute(true)
		g.SetGoPID(gone.Process.Pid)
		from := g.Counters().Records
		for g.Counters().GiveUps == 0 || g.SyncOn() || g.Counters().Records < from+1000 {
			select {
			case <-ctx.Done():
				t.Fatalf("the Go side stopped answering: %d holds given up, sync on %v, %d records since", g.Counters().GiveUps, g.SyncOn(), g.Counters().Records-from)
			case <-time.After(10 * time.Millisecond):
			}
		}
		dead = g.Counters()
		g.Mute(false)
	}
	s := runOracle(t, oracleRun{cfg: qemu.Config{Workload: "mixed", Jobs: 2, Sync: true, Windows: true}, checkpoints: 3, verdict: verdict, last: last})
	t.Logf("after the Go side stopped answering and was found gone: %d holds given up, the guest went on (%d records in all)", dead.GiveUps, dead.Records)
	t.Logf("synchronous delivery: %d stores submitted synchronously, vCPUs held %v in all (%v per store); %d windows of %d window records; %d denied, %d reverted, %d not",
		synced.Synced, time.Duration(synced.Plugin.HeldNs), time.Duration(synced.Plugin.HeldNs/max(synced.Synced, 1)), synced.Windows, synced.Plugin.WindowRecs, s.Denied, s.Reverted, s.Unreverted)
	// Every event is a store submitted synchronously, or the revert of a
	// denied one.
	if s.Synced == 0 || s.Synced+s.Reverted != s.Submitted {
		t.Errorf("%d stores submitted synchronously and %d reverts, of %d events submitted", s.Synced, s.Reverted, s.Submitted)
	}
	// Asynchronous delivery has some 200 windows in such a run
	// (TestLinuxForkOracle). Synchronous delivery should have none; runs
	// count 0 to 3, not all of them windows: the count is a heuristic (the
	// plugin marks every page a present entry points to, leaves' data
	// pages too; one counted was a page mapped as data, zeroed, then hooked
	// as a table with no record linking it), so the bound is not 0 yet.
	if synced.Windows > syncWindowsMax {
		t.Errorf("%d stores reached a table between its link and its hook with synchronous delivery (at most %d expected)", synced.Windows, syncWindowsMax)
	}
	mu.Lock()
	defer mu.Unlock()
	if nDenied == 0 || int(s.Denied) != nDenied || s.Reverted != s.Denied || s.Unreverted != 0 || nReverted != nDenied {
		t.Errorf("denied %d (the backend counts %d), reverted %d (reported %d), not reverted %d", nDenied, s.Denied, s.Reverted, nReverted, s.Unreverted)
	}
	for _, b := range bad {
		t.Error(b)
	}
}

// leafAt returns the entry that maps va in the user half of info's root, 0
// if none does.
func leafAt(mem vasmon.Memory, info *backends.RootInfo, va uint64) uint64 {
	m := info.Mode
	table := info.CR3
	for level := m.Levels(); level >= 1; level-- {
		i := va >> (12 + 9*(level-1)) & 511
		var b [8]byte
		if mem.Read(table+8*i, b[:]) != nil {
			return 0
		}
		e := binary.LittleEndian.Uint64(b[:])
		switch m.Classify(e, level) {
		case vasmon.KindTable:
			table = m.TableAddr(e)
		case vasmon.KindLeaf:
			return e
		default:
			return 0
		}
	}
	return 0
}
