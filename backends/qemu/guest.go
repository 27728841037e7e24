package qemu

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/puzpuzpuz/xsync/v3"
	"golang.org/x/sys/unix"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

const drainBatch = 512

// drainPoll is how long the drainer sleeps when the ring is empty.
const drainPoll = 50 * time.Microsecond

// unversioned makes guests give the engine their RAM without the plugin's
// version words (the plugin still keeps them), as before the engine could
// prove its reads: only for showing what the proofs prevent (phantom
// callbacks); tests set it through export_test.go.
var unversioned bool

// Guest is one running QEMU guest monitored on an engine.Host.
type Guest struct {
	ID   vasmon.VMID
	cfg  Config
	host engine.Host
	req  backends.Request

	dir      string
	ram      *ram
	mem      vasmon.Memory // what the engine reads: ram with the plugin's version words
	phantoms phantoms      // callbacks no Linux guest could have caused
	ctl      *control      // nil with NoPlugin
	pages    *pages        // the protected pages as the backend knows them (nil with NoPlugin)
	syncer   Syncer        // with Config.Sync: the drainer's synchronous submitter
	one      [1]shard.Event
	det      *detector  // the reference kernel half: lifeMu
	lifeMu   sync.Mutex // held by whoever starts or stops roots (see lifecycle)
	pauseMu  sync.Mutex // held by whoever stops or lets run the vCPUs (QMP stop, cont)
	qmp      *qmp
	cmd      *exec.Cmd
	exited   chan struct{}
	exitErr  error
	clockOff int64 // CLOCK_MONOTONIC - shard.Now()
	ctx      context.Context
	cancel   context.CancelFunc

	started             time.Time
	workAt, doneAt      atomic.Int64 // ns since started; 0: not yet
	consoleMu           sync.Mutex
	consoleTail         []string
	paused              atomic.Bool
	muted               atomic.Bool   // the drainer consumes nothing (tests: a Go side that stopped answering)
	drained             atomic.Uint64 // records consumed and submitted
	tableStores, narrow atomic.Uint64 // stores to protected pages (per page touched); of which narrower than 8 bytes
	submitted, rejected atomic.Uint64
	synced, denied      atomic.Uint64 // synchronous submissions; of which denied
	reverted, lost      atomic.Uint64 // denied stores reverted; denied stores that could not be
	quitDrain, quitLife chan struct{}
	drainDone, lifeDone chan struct{}
	ops                 chan op
	roots               *xsync.MapOf[uint64, *rootState] // by root page GPA
	ls                  lifeStats                        // lifecycle counters
	closeOnce           sync.Once
	closeErr            error
	qemuCPU             time.Duration
	added               bool     // registered with the host
	finalCounters       Counters // the plugin's counters when Close unmapped them
	closedAt            time.Duration
}

// GuestStats are one guest's counters.
type GuestStats struct {
	VM        vasmon.VMID
	Plugin    Counters // the plugin's counters (zero with NoPlugin)
	Submitted uint64   // events submitted to the host
	Rejected  uint64   // events the host refused (it was closing, or the VM unknown)
	// TableStores are the guest's stores to write-protected pages (to its
	// hooked page tables, or to freed ones not yet released), counted once
	// per page a store touched, from the records: a store touching several
	// entries makes one record per entry. NarrowStores are those of fewer
	// than 8 bytes (bit operations on an entry).
	TableStores, NarrowStores uint64
	// Phantoms are the callbacks reporting a present entry that maps or
	// links a frame outside guest RAM, or sets bits reserved at its level
	// (see CheckEntry): Linux writes no such entry, so each is a callback
	// that was never true in the guest (SEMANTICS.md section 6, "No
	// phantoms"). It must stay 0.
	// Present counts the callbacks with a present new entry: those checked.
	Phantoms, Present uint64
	// FirstPhantoms are the first phantom callbacks (at most 8), for the
	// report of a run that had any.
	FirstPhantoms []PhantomCall `json:",omitempty"`
	// With Config.Sync: Synced are the records submitted synchronously
	// (their vCPU held until the engine was done), Denied those a callback
	// denied, Reverted the denied stores whose entry the backend put back
	// (and submitted so), Unreverted the denied stores it could not put
	// back (their old value was not known, or the entry changed since):
	// they took effect.
	Synced, Denied, Reverted, Unreverted uint64
	// Windows (Config.Windows) are the stores into a page after an entry
	// record linked it and before the engine hooked it as a table: what
	// the engine reads when it hooks the page instead of trapping it. 0
	// with Config.Sync for Linux guests, whose writer of a link holds the
	// page-table lock until its own stores into the new table.
	Windows uint64
	Roots   RootStats
	// Boot is the time from starting QEMU to the workload's start; Workload
	// from its start to its end (0 if it did not finish).
	Boot, Workload, Wall time.Duration
	QEMUCPU              time.Duration // user+system CPU time of the QEMU process
	Exit                 error         // how QEMU ended, if it did by itself or failed
}

// StartGuest boots one guest as VM id, registers it with host (unless
// NullConsumer or NoPlugin) and starts monitoring its address spaces with req.
// cfg is defaulted as by Run.
func StartGuest(ctx context.Context, host engine.Host, id vasmon.VMID, cfg Config, req backends.Request) (*Guest, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	monitoring := !cfg.NullConsumer && !cfg.NoPlugin
	if monitoring && (host == nil || req.Callback == nil) {
		return nil, errors.New("qemu: a host and a callback are needed (or NullConsumer)")
	}
	kernel, initrd, plugin, err := Artifacts(cfg.Dir)
	if err != nil {
		return nil, err
	}
	if _, err := exec.LookPath(cfg.QEMU); err != nil {
		return nil, fmt.Errorf("qemu: %w (run scripts/qemu-setup.sh)", err)
	}
	removeStale()
	dir, err := os.MkdirTemp("/dev/shm", fmt.Sprintf("vasqemu-%d-vm%d-", os.Getpid(), id))
	if err != nil {
		return nil, err
	}
	g := &Guest{ID: id, cfg: cfg, host: host, req: req, dir: dir, exited: make(chan struct{}),
		quitDrain: make(chan struct{}), quitLife: make(chan struct{}), drainDone: make(chan struct{}),
		lifeDone: make(chan struct{}), ops: make(chan op, 1024), roots: xsync.NewMapOf[uint64, *rootState](),
		clockOff: clockOffset(), det: &detector{cand: make(map[[512 - userEntries]uint64]uint64)}}
	g.ctx, g.cancel = context.WithCancel(ctx)
	ok := false
	defer func() {
		if !ok {
			if g.syncer != nil {
				g.syncer.Close()
			}
			if g.added {
				_ = host.RemoveVM(context.Background(), id)
			}
			g.cleanup(true)
		}
	}()
	size := uint64(cfg.MemMB) << 20
	if g.ram, err = newRAM(filepath.Join(dir, "ram"), size, cfg.Sync); err != nil {
		return nil, err
	}
	g.mem = g.ram
	if !cfg.NoPlugin {
		if g.ctl, err = newControl(filepath.Join(dir, "ctl"), size, cfg.RingSlots, cfg.Windows); err != nil {
			return nil, err
		}
		g.pages = newPages(g.ram, g.ctl.vers, cfg.Sync && monitoring, cfg.Windows)
		if !unversioned {
			g.mem = versionedRAM{g.ram, g.ctl.vers}
		}
	}
	if monitoring {
		g.phantoms.ramBytes = size
		g.req.Callback = g.phantoms.check(req.Callback)
		if req.Options.Verdict != nil {
			g.req.Options.Verdict = g.phantoms.checkVerdict(req.Options.Verdict)
		}
		if cfg.Sync {
			if g.syncer, err = newSyncer(&cfg, host, id); err != nil {
				return nil, err
			}
		}
		if err := host.AddVM(id, g.mem, protector{g.ctl, g.pages}, 0); err != nil {
			return nil, err
		}
		g.added = true
	}
	sock := filepath.Join(dir, "qmp.sock")
	args := []string{"-accel", "tcg", "-m", fmt.Sprint(cfg.MemMB), "-smp", fmt.Sprint(cfg.VCPUs),
		"-nographic", "-no-reboot", "-vga", "none", "-nic", "none",
		"-kernel", kernel, "-initrd", initrd,
		"-append", fmt.Sprintf("console=ttyS0 panic=-1 rdinit=/init quiet vaswl=%s vasn=%d vasjobs=%d",
			cfg.Workload, cfg.Rounds, cfg.Jobs),
		"-object", fmt.Sprintf("memory-backend-file,id=ram0,size=%dM,mem-path=%s,share=on", cfg.MemMB, g.ram.path),
		"-machine", "pc,memory-backend=ram0",
		"-qmp", "unix:" + sock + ",server=on,wait=off"}
	if g.ctl != nil {
		args = append(args, "-plugin", fmt.Sprintf("file=%s,ctl=%s,ram=%s", plugin, g.ctl.path, g.ram.path))
	}
	g.cmd = exec.Command(cfg.QEMU, args...)
	g.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := g.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	g.cmd.Stderr = g.cmd.Stdout
	g.started = time.Now()
	if err := g.cmd.Start(); err != nil {
		return nil, fmt.Errorf("qemu: %w", err)
	}
	consoleDone := make(chan struct{})
	go g.console(out, consoleDone)
	go func() {
		err := g.cmd.Wait()
		<-consoleDone
		if err != nil {
			err = fmt.Errorf("qemu: VM %d: %v; console ends:\n%s", id, err, g.tail())
		}
		g.exitErr = err
		if ps := g.cmd.ProcessState; ps != nil {
			g.qemuCPU = ps.UserTime() + ps.SystemTime()
		}
		close(g.exited)
	}()
	if g.qmp, err = dialQMP(sock, 10*time.Second); err != nil {
		g.kill()
		return nil, fmt.Errorf("%w; console:\n%s", err, g.tail())
	}
	if g.ctl != nil && !g.ctl.attached() {
		g.kill()
		return nil, fmt.Errorf("qemu: VM %d: the plugin did not attach; console:\n%s", id, g.tail())
	}
	if g.ctl != nil {
		g.ctl.setSync(g.syncer != nil)
		go g.drain()
	} else {
		close(g.drainDone)
	}
	go g.lifecycle()
	ok = true
	return g, nil
}

// removeStale removes the shared files of guests whose process has died
// without Close (killed tests): their directory names carry its PID.
func removeStale() {
	dirs, _ := filepath.Glob("/dev/shm/vasqemu-*-vm*")
	for _, d := range dirs {
		var pid int
		if _, err := fmt.Sscanf(filepath.Base(d), "vasqemu-%d-", &pid); err != nil || pid <= 0 {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			_ = os.RemoveAll(d)
		}
	}
}

// protector write-protects pages by setting their protected bits in the
// plugin's version words.
type protector struct {
	c *control
	p *pages
}

func (p protector) Protect(gpa uint64) error   { return p.c.protect(p.p, gpa, true) }
func (p protector) Unprotect(gpa uint64) error { return p.c.protect(p.p, gpa, false) }

// clockOffset returns CLOCK_MONOTONIC minus shard.Now(), in ns.
func clockOffset() int64 {
	best, off := int64(math.MaxInt64), int64(0)
	for i := 0; i < 16; i++ {
		var ts unix.Timespec
		a := shard.Now()
		_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
		b := shard.Now()
		if b-a < best {
			best, off = b-a, ts.Nano()-(a+b)/2
		}
	}
	return off
}

func (g *Guest) console(r io.Reader, done chan struct{}) {
	defer close(done)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		at := time.Since(g.started).Nanoseconds()
		switch {
		case strings.Contains(line, "vasqemu: start"):
			g.workAt.Store(at)
		case strings.Contains(line, "vasqemu: done"):
			g.doneAt.Store(at)
		}
		g.consoleMu.Lock()
		if g.consoleTail = append(g.consoleTail, line); len(g.consoleTail) > 40 {
			g.consoleTail = g.consoleTail[1:]
		}
		g.consoleMu.Unlock()
		if w := g.cfg.Console; w != nil {
			fmt.Fprintf(w, "vm%d| %s\n", g.ID, line)
		}
	}
}

func (g *Guest) tail() string {
	g.consoleMu.Lock()
	defer g.consoleMu.Unlock()
	return strings.Join(g.consoleTail, "\n")
}

// Exited is closed when QEMU has exited (the guest powered off, or Close).
func (g *Guest) Exited() <-chan struct{} { return g.exited }

// WorkloadDone reports whether the guest's workload has finished.
func (g *Guest) WorkloadDone() bool { return g.doneAt.Load() != 0 }

// WorkloadStarted reports whether the guest's /init has started its workload.
func (g *Guest) WorkloadStarted() bool { return g.workAt.Load() != 0 }

// QEMUCPU returns the user+system CPU time QEMU has used so far (from
// /proc; after it exited, its final figure).
func (g *Guest) QEMUCPU() time.Duration {
	select {
	case <-g.exited:
		return g.qemuCPU
	default:
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", g.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	// Fields after the parenthesised command name: state is field 3,
	// utime and stime are fields 14 and 15, in clock ticks (100 Hz).
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	var ut, st int64
	fmt.Sscan(f[11], &ut)
	fmt.Sscan(f[12], &st)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

// Memory returns the guest's RAM as the monitor reads it (with the plugin's
// version words: vasmon.Versioned).
func (g *Guest) Memory() vasmon.Memory { return g.mem }

// Counters returns the plugin's counters.
func (g *Guest) Counters() Counters {
	if g.ctl == nil {
		return Counters{}
	}
	if g.ctl.buf == nil {
		return g.finalCounters
	}
	return g.ctl.counters()
}

// drain moves records from the ring to the host, in ring order. With
// Config.Sync it submits each entry record synchronously and answers the
// plugin, which holds the record's vCPU until then.
func (g *Guest) drain() {
	defer close(g.drainDone)
	evs := make([]shard.Event, 0, drainBatch)
	idle := int64(0) // when the ring was found empty (sync), 0: it was not
	for {
		if g.muted.Load() {
			select {
			case <-g.quitDrain:
				return
			case <-time.After(drainPoll):
			}
			continue
		}
		evs = evs[:0]
		n := g.ctl.consume(drainBatch, func(r *record) {
			switch r.Kind & recKind {
			case recPGD:
				if g.syncer != nil {
					// The vCPU that filled the new PGD is held until
					// its root is started (or refused).
					g.ls.births.Add(1)
					g.lifeMu.Lock()
					g.birth(r.GPA)
					g.lifeMu.Unlock()
					g.ctl.ack(r.VCPU, r.Seq)
				} else {
					g.newPGD(r.GPA)
				}
				return
			case recWindow:
				if g.cfg.Windows {
					g.pages.window(r)
				}
				return
			}
			if r.GPA == r.StoreGPA&^7 { // the first entry the store touched on this page
				g.tableStores.Add(1)
				if r.Size < 8 {
					g.narrow.Add(1)
				}
			}
			g.watchRoot(r)
			if g.cfg.Windows {
				g.pages.link(r.Val)
			}
			ev := shard.Event{GPA: r.GPA, Data: r.Val, Size: 8, Trap: r.TS - g.clockOff, Ver: r.Ver}
			if g.syncer == nil {
				evs = append(evs, ev)
				return
			}
			if !g.cfg.NullConsumer {
				g.submitSync(r, ev)
			}
			g.ctl.ack(r.VCPU, r.Seq)
		})
		if n > 0 {
			if !g.cfg.NullConsumer && len(evs) > 0 {
				k, _ := g.host.Submit(g.ID, evs)
				g.submitted.Add(uint64(k))
				g.rejected.Add(uint64(len(evs) - k))
			}
			g.drained.Add(uint64(n))
			idle = 0
			continue
		}
		select {
		case <-g.quitDrain:
			return
		default:
		}
		if g.syncer == nil {
			// Poll: no spinning (it would take the CPU from QEMU's
			// vCPU threads).
			time.Sleep(drainPoll)
			continue
		}
		// A held vCPU waits for this goroutine: poll briefly, then sleep
		// until the plugin rings (or drainPoll*20, for the records that
		// hold no vCPU).
		now := shard.Now()
		if idle == 0 {
			idle = now
		}
		if now-idle < int64(syncSpin) {
			runtime.Gosched()
			continue
		}
		g.ctl.waitBell(20 * drainPoll)
	}
}

// syncSpin is how long the drainer polls an empty ring in sync mode before
// it sleeps on the plugin's bell.
const syncSpin = 20 * time.Microsecond

// submitSync submits the entry record r as ev synchronously. If a callback
// denies it, it puts the entry's old value back in guest RAM (a trapped
// write of the backend's own, stamped on the page's version word) and
// submits that synchronously too, before the plugin lets the vCPU go on.
func (g *Guest) submitSync(r *record, ev shard.Event) {
	old, known := g.pages.apply(r)
	g.one[0] = ev
	v, err := g.syncer.Submit(g.one[:])
	g.synced.Add(1)
	if err != nil {
		g.rejected.Add(1)
		return
	}
	g.submitted.Add(1)
	if v != shard.Deny {
		return
	}
	g.denied.Add(1)
	var s uint32
	if known {
		s = g.pages.revert(r.GPA, r.Val, old)
	}
	if s == 0 {
		g.lost.Add(1)
		return
	}
	g.reverted.Add(1)
	g.one[0] = shard.Event{GPA: r.GPA, Data: old, Size: 8, Trap: shard.Now(), Ver: s}
	// The restoring write's own verdict is not asked: it always happens.
	if _, err := g.syncer.Submit(g.one[:]); err != nil {
		g.rejected.Add(1)
	} else {
		g.submitted.Add(1)
	}
}

// Pause stops the guest's vCPUs (QMP stop), then waits until every record
// they pushed has been submitted and every root discovery or stop decided
// so far has been carried out. After Pause and the host's Sync, the engine
// has seen every page-table write of the guest. Root discovery is suspended
// until Resume.
func (g *Guest) Pause(ctx context.Context) error {
	g.pauseMu.Lock()
	g.paused.Store(true)
	_, err := g.qmp.do("stop", nil)
	g.pauseMu.Unlock()
	if err != nil {
		return err
	}
	return g.settle(ctx)
}

// settle waits for the drainer to catch up with the ring and for the
// lifecycle goroutine to carry out what it was told.
func (g *Guest) settle(ctx context.Context) error {
	if g.ctl != nil {
		head := g.ctl.head()
		for g.drained.Load() < head {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-g.drainDone:
				return errors.New("qemu: drainer stopped")
			case <-time.After(100 * time.Microsecond):
			}
		}
	}
	done := make(chan struct{})
	select {
	case g.ops <- op{kind: opSync, done: done}:
	case <-g.lifeDone:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-done:
		return nil
	case <-g.lifeDone:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Resume lets a paused guest run on (QMP cont).
func (g *Guest) Resume() error {
	g.pauseMu.Lock()
	defer g.pauseMu.Unlock()
	_, err := g.qmp.do("cont", nil)
	g.paused.Store(false)
	return err
}

func (g *Guest) kill() {
	if g.cmd != nil && g.cmd.Process != nil {
		_ = g.cmd.Process.Kill()
		<-g.exited
	}
}

// Close stops the guest: it pauses it, submits what is left in the ring,
// removes the VM from the host (stopping its roots: their mappings are
// reported removed), ends QEMU and removes the shared files.
func (g *Guest) Close(ctx context.Context) error {
	g.closeOnce.Do(func() {
		var errs []error
		select {
		case <-g.exited:
		default:
			g.pauseMu.Lock()
			g.paused.Store(true)
			_, err := g.qmp.do("stop", nil)
			g.pauseMu.Unlock()
			if err != nil {
				select {
				case <-g.exited: // it was powering off
				default:
					errs = append(errs, err)
				}
			}
		}
		if err := g.settle(ctx); err != nil {
			errs = append(errs, err)
		}
		close(g.quitLife)
		<-g.lifeDone
		if g.ctl != nil {
			// Nobody answers holds any more: the vCPUs go on.
			g.ctl.setSync(false)
		}
		close(g.quitDrain)
		<-g.drainDone
		if g.syncer != nil {
			g.syncer.Close()
		}
		g.cancel()
		unmap := true
		if g.added {
			if err := g.host.RemoveVM(ctx, g.ID); err != nil {
				errs = append(errs, err)
				// The engine may still read the RAM or flip protection
				// bits: keep both mapped (only the files go).
				unmap = false
			}
		}
		select {
		case <-g.exited:
			if g.exitErr != nil {
				errs = append(errs, g.exitErr)
			}
		default:
			_, _ = g.qmp.do("quit", nil)
			select {
			case <-g.exited:
			case <-time.After(5 * time.Second):
				g.kill()
			}
		}
		g.qmp.close()
		g.finalCounters = g.Counters()
		g.closedAt = time.Since(g.started)
		g.cleanup(unmap)
		g.closeErr = errors.Join(errs...)
	})
	return g.closeErr
}

// cleanup removes the shared files and, if unmap, unmaps them.
func (g *Guest) cleanup(unmap bool) {
	if g.ctl != nil && unmap {
		g.ctl.close()
	}
	if g.ram != nil && unmap {
		g.ram.close()
	}
	_ = os.RemoveAll(g.dir)
}

// Stats returns the guest's counters.
func (g *Guest) Stats() GuestStats {
	s := GuestStats{VM: g.ID, Plugin: g.Counters(), Submitted: g.submitted.Load(), Rejected: g.rejected.Load(),
		TableStores: g.tableStores.Load(), NarrowStores: g.narrow.Load(), Phantoms: g.phantoms.n.Load(), Present: g.phantoms.present.Load(),
		Synced: g.synced.Load(), Denied: g.denied.Load(), Reverted: g.reverted.Load(), Unreverted: g.lost.Load(),
		Roots: g.ls.snapshot(), Wall: time.Since(g.started), FirstPhantoms: g.Phantoms()}
	if g.closedAt != 0 {
		s.Wall = g.closedAt
	}
	if g.pages != nil {
		s.Windows = g.pages.windows.Load()
	}
	w, d := g.workAt.Load(), g.doneAt.Load()
	s.Boot = time.Duration(w)
	if w != 0 && d != 0 {
		s.Workload = time.Duration(d - w)
	}
	select {
	case <-g.exited:
		s.QEMUCPU, s.Exit = g.qemuCPU, g.exitErr
	default:
	}
	return s
}
