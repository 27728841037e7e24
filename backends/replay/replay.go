// Package replay is the backend that replays a trace (package trace) into an
// engine.Host, without the guest it was recorded from.
//
// # Contract
//
// Ownership: Run owns, per VM of the trace, a sparse guestmem.Memory of the
// recorded RAM size, the version word of each of its pages
// (guestmem.Versions; not kept for a guest above 64 GiB) and a Protector
// that records the set of protected pages and keeps their protected bits.
// The host reads the memory with its version words (vasmon.Versioned). Run
// applies the records in stream order: a Page record's content and each
// event's bytes are written to the VM's memory, then the events are submitted
// (consecutive events of one VM in batches of up to 256, stamped at
// submission). An event's bytes written to a page protected at that moment
// are a trapped store, as in the recorded guest: counted on the page's
// version word around the write (BeginWrite, EndWrite), and the event
// carries that count (Ver, Ver2 for the second page of a store that crosses
// one); the protection is tested again after the write, so that a page
// protected meanwhile sees the store either in the host's read of it or
// stamped after the fact (Trap). Events written to unprotected pages are
// submitted unstamped: the host drops them, their bytes already in memory
// when it reads the page. An event's old value (if it has one) is read from
// the replay's memory before the write, as a backend reads its guest's: the
// recorded one is the recorded guest's, whose stores the recording engine
// did not trap reach the trace only through Page records, which may follow
// the events. A stamped event is submitted without its RIP: the stamp tells
// a trap delivered twice, and the engine's test on RIPs (the same RIP and
// bytes as the last chunk applied to the entry) would also drop a store
// repeated after the entry changed through a read of its page. VMs are added and removed, roots started and stopped (with the
// request's monitored bits, callback and options, or the recorded ones with
// AsRecorded; the callback's context is a *backends.RootInfo). When Run
// returns, the VMs and roots the trace left registered stay registered with
// the host (Summary.Live holds them), so a caller can inspect them.
//
// Pages hooked early: the engine hooks a table asynchronously, so the replay
// engine may hook a page (and read it) before the reader reaches the Page
// record the recording engine wrote for the same hook. When a Page record
// changes a page that is protected at that moment, Run writes it one 8-byte
// word at a time, each a trapped store (stamped as above) submitted as a
// write event without old value, as a backend would trap the guest's
// stores; the engine compares each with its copy, so every root still
// satisfies the oracle against the replayed memory. Protection precedes
// reading in the engine, so a page not yet protected when its Page record is
// written is read with that content (a page protected while it is written
// has its changed words stamped after the fact and submitted too).
// Summary.Synthetic counts those events.
//
// Roots: before starting a root, Run waits until the events it submitted
// have been processed, if the host has a Sync method (engine.Engine does). The
// engine builds a new root from the copies it holds of pages already hooked
// for other roots without applying the events still queued for them, so a
// root started with its VM's events queued starts from an older tree than
// guest memory shows (the simulator's tests work around the same issue).
//
// Timing: at Speed 0 records are applied as fast as the host takes them; at
// Speed s > 0, at s times the recorded pace. The clock is read about once
// per millisecond of replay (s milliseconds of trace time), after the pending
// batch is submitted, and Run sleeps when it is ahead.
//
// Damage: without Options.Salvage a damaged trace ends Run with the trace's
// error (the records before it have been applied: the stream is not checked
// ahead); with it, Run stops cleanly at the first damaged block and reports
// the damage in Summary.Damage.
//
// Concurrency: Run is one goroutine (plus the host's); memory is written only
// by it, and read by the host's workers concurrently.
//
// Allocation: the trace is read block by block (constant memory); the event
// path allocates only guest pages written for the first time.
package replay

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/guestmem"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/trace"
	"github.com/vasengine/vasengine/vasmon"
)

// Speeds.
const (
	Max      = 0 // as fast as the host takes the events
	Recorded = 1 // the recorded pace
)

// Options configure a replay.
type Options struct {
	Speed   float64 // 0: maximum; 1: recorded; s: s times the recorded pace
	Salvage bool    // stop cleanly at the first damaged block
	Request backends.Request
	// AsRecorded starts roots with the recorded monitored bits and options
	// instead of the request's (the request's callback is used either way).
	AsRecorded bool
	// OnStart, if set, runs after each root starts, before the next record
	// is applied (a test can walk the tree there).
	OnStart func(r *vasmon.Root, mem *guestmem.Memory)
	// Batch is the most events submitted at once; 0: 256.
	Batch int
	// Sync submits every event synchronously, one at a time, through a
	// Syncer per VM (backends.NewSyncer; SEMANTICS.md section 7): the
	// replay goes on only once the event's closure is done. The accounting
	// is the asynchronous replay's. Verdicts are counted by the engine but
	// not acted on: the trace's later records are what the guest did.
	Sync bool
}

// Summary says what a replay did. It accounts for every record of the
// trace: Records == sum of Read == Applied + the skipped ones (SkippedNoVM,
// SkippedNoRoot); Unknown records were skipped by the reader before that.
// What reaches the host's Submit: Events + Synthetic, plus Retried in the
// engine's non-blocking mode.
type Summary struct {
	Records   int64 // records read (of known kinds)
	Read      [NumKinds]int64
	Applied   int64 // records applied to the host or to guest memory
	Events    int64 // events of the trace submitted
	Synthetic int64 // write events made up for pages hooked before their Page record
	// SyntheticPages are the Page records that made synthetic events.
	SyntheticPages int64
	Retried        int64 // events submitted again after the host refused them (engine.ErrOverload)
	Pages          int64 // Page records applied
	// Skipped is every record skipped: SkippedNoVM (by kind: records of a
	// VM not registered, e.g. events that raced a RemoveVM while recording)
	// plus SkippedNoRoot (RootStop records of a root not started).
	Skipped       int64
	SkippedNoVM   [NumKinds]int64
	SkippedNoRoot int64
	// Unknown are records of kinds this reader does not know (a later
	// minor version of the format), skipped by the reader.
	Unknown int64
	// TraceRecords is the record count of the trace's End record (0 if the
	// replay did not reach it: damage, or ctx ended first); Complete says
	// it was reached and checked.
	TraceRecords int64
	Complete     bool
	VMs          int   // VMs added
	Roots        int   // roots started
	Bytes        int64 // trace bytes read
	Span         time.Duration
	Damage       error               // with Salvage: the damage that ended the trace early
	Live         map[vasmon.VMID]*VM // VMs registered when Run returned
}

// NumKinds sizes the per-kind counts of a Summary (indexed by trace.Kind).
const NumKinds = int(trace.KindEvent) + 1

// VM is a replayed guest.
type VM struct {
	ID    vasmon.VMID
	Mem   *guestmem.Memory
	Ver   *guestmem.Versions      // the version words of Mem's pages; nil above maxVersioned
	Roots map[uint64]*vasmon.Root // running roots by CR3
	prot  *protector
	esz   int // entry size of the paging mode of its last root started (8 before any)
}

// maxVersioned is the largest guest RAM whose version words are kept (8
// bytes per page, allocated up front): a larger guest's memory is given to
// the host unversioned.
const maxVersioned = 1 << 36

// memory is a VM's memory with its version words (vasmon.Versioned).
type memory struct {
	*guestmem.Memory
	ver *guestmem.Versions
}

// Versions implements vasmon.Versioned.
func (m memory) Versions() *guestmem.Versions { return m.ver }

// hostMemory returns the VM's memory as the host reads it.
func (v *VM) hostMemory() vasmon.Memory {
	if v.Ver == nil {
		return v.Mem
	}
	return memory{v.Mem, v.Ver}
}

// protected reports whether the page holding gpa is write-protected now.
func (v *VM) protected(gpa uint64) bool { return v.Ver != nil && v.Ver.Protected(gpa) }

// write stores the low size bytes of data at gpa, as the recorded guest
// did, and returns the stamps of the trapped store: on gpa's page and, for a
// store that crosses into the next page, on that one (see the package
// comment). stamped says every stamp was taken before the store reached
// memory (shard.Event.Stamped).
func (v *VM) write(gpa uint64, size uint8, data uint64) (ver, ver2 uint32, stamped bool) {
	last := gpa + uint64(size) - 1
	split := last/trace.PageSize != gpa/trace.PageSize
	p1, p2 := v.protected(gpa), split && v.protected(last)
	if p1 {
		ver = v.Ver.BeginWrite(gpa)
	}
	if p2 {
		ver2 = v.Ver.BeginWrite(last)
	}
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], data)
	_ = v.Mem.Write(gpa, b[:size]) // outside RAM: the engine ignores it too
	stamped = true
	if p1 {
		v.Ver.EndWrite(gpa)
	} else if v.protected(gpa) {
		ver, stamped = v.Ver.Trap(gpa), false
	}
	if p2 {
		v.Ver.EndWrite(last)
	} else if split && v.protected(last) {
		ver2, stamped = v.Ver.Trap(last), false
	}
	return ver, ver2, stamped
}

// Protected returns the number of pages the host has protected.
func (v *VM) Protected() int { return v.prot.count() }

type player struct {
	ctx   context.Context
	host  engine.Host
	opts  Options
	sum   *Summary
	tr    *trace.Reader
	batch []shard.Event
	bvm   vasmon.VMID
	old   [trace.PageSize]byte
	syncs map[vasmon.VMID]backends.Syncer // Options.Sync

	t0, check int64
	w0        time.Time
}

// Run replays the trace read from r into host until its end, the first error
// or ctx's end, and returns what it did (also on error).
func Run(ctx context.Context, host engine.Host, r io.Reader, opts Options) (*Summary, error) {
	tr, err := trace.NewReader(r, trace.ReaderOptions{Salvage: opts.Salvage})
	if err != nil {
		return &Summary{Live: make(map[vasmon.VMID]*VM)}, err
	}
	return RunReader(ctx, host, tr, opts)
}

// RunReader is Run on a trace whose header was read already (tr's
// ReaderOptions.Salvage stands for Options.Salvage). It reads tr to its end;
// the caller may read tr's header in advance, from a pipe too.
func RunReader(ctx context.Context, host engine.Host, tr *trace.Reader, opts Options) (*Summary, error) {
	sum := &Summary{Live: make(map[vasmon.VMID]*VM)}
	if opts.Batch <= 0 {
		opts.Batch = 256
	}
	if opts.Speed < 0 {
		return sum, fmt.Errorf("replay: speed %v must not be negative", opts.Speed)
	}
	if opts.Request.Callback == nil {
		opts.Request.Callback = func(any, uint64, uint64, uint64, uint64) {}
	}
	p := &player{ctx: ctx, host: host, opts: opts, sum: sum, tr: tr, batch: make([]shard.Event, 0, opts.Batch)}
	err := p.run()
	if ferr := p.flush(); err == nil {
		err = ferr
	}
	for _, sy := range p.syncs {
		sy.Close()
	}
	sum.Bytes = tr.Bytes()
	sum.Damage = tr.Damage()
	sum.Unknown = int64(tr.Unknown())
	if sum.Complete = tr.Ended(); sum.Complete {
		sum.TraceRecords = int64(tr.Records())
	}
	return sum, err
}

func (p *player) run() error {
	first := true
	for n := 0; ; n++ {
		if n%256 == 0 {
			if err := p.ctx.Err(); err != nil {
				return err
			}
		}
		rec, err := p.tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if first {
			p.t0, p.w0, p.check, first = rec.Time, time.Now(), rec.Time, false
		}
		p.sum.Span = time.Duration(max(rec.Time-p.t0, int64(p.sum.Span)))
		if p.opts.Speed > 0 && rec.Time >= p.check {
			if err := p.pace(rec.Time); err != nil {
				return err
			}
		}
		p.sum.Records++
		if int(rec.Kind) < NumKinds {
			p.sum.Read[rec.Kind]++
		}
		applied, err := p.apply(rec)
		if err != nil {
			return fmt.Errorf("replay: %v record at offset %d: %w", rec.Kind, p.tr.Offset(), err)
		}
		if applied {
			p.sum.Applied++
		}
	}
}

// pace sleeps until the wall-clock time of trace time t, after submitting
// what is pending, and sets when to look at the clock next.
func (p *player) pace(t int64) error {
	if err := p.flush(); err != nil {
		return err
	}
	p.check = t + int64(float64(time.Millisecond)*p.opts.Speed)
	d := time.Until(p.w0.Add(time.Duration(float64(t-p.t0) / p.opts.Speed)))
	if d < 200*time.Microsecond {
		return nil
	}
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-tm.C:
		return nil
	case <-p.ctx.Done():
		return p.ctx.Err()
	}
}

// apply applies a record; false: it was skipped (counted).
func (p *player) apply(rec *trace.Record) (bool, error) {
	err := p.applyErr(rec)
	if err == errSkipped {
		return false, nil
	}
	return err == nil, err
}

var errSkipped = errors.New("skipped")

func (p *player) applyErr(rec *trace.Record) error {
	v := p.sum.Live[rec.VM]
	if v == nil && rec.Kind != trace.KindVMAdd {
		p.sum.Skipped++
		if int(rec.Kind) < NumKinds {
			p.sum.SkippedNoVM[rec.Kind]++
		}
		return errSkipped
	}
	switch rec.Kind {
	case trace.KindEvent:
		old := rec.Old
		if rec.HasOld {
			// The entry before the write in this memory, which may differ
			// from the recorded guest's: a store the recorded engine did
			// not trap (its page unprotected for a moment) is only in a
			// Page record, which may come after the events trapped once
			// the page was protected again.
			esz := uint64(v.esz)
			old, _ = v.Mem.ReadUint(rec.GPA&^(esz-1), int(esz))
		}
		ver, ver2, stamped := v.write(rec.GPA, rec.Size, rec.Data)
		p.sum.Events++
		rip := rec.RIP
		if ver != 0 || ver2 != 0 {
			// The stamp tells a trap delivered twice. The engine's window
			// of recent chunks (same RIP, offset and bytes as the last
			// chunk applied to the entry) would drop a store repeated after
			// the entry changed through a read of its page instead of a
			// chunk (a munmap's clear after a fault whose event was
			// already in a read): not given the RIP, the engine keeps
			// only the stamp's test.
			rip = 0
		}
		return p.add(rec.VM, shard.Event{GPA: rec.GPA, Data: rec.Data, Old: old, RIP: rip,
			Size: rec.Size, HasOld: rec.HasOld, Ver: ver, Ver2: ver2, Stamped: stamped})
	case trace.KindPage:
		p.sum.Pages++
		return p.page(v, rec.GPA, rec.Page)
	}
	if err := p.flush(); err != nil {
		return err
	}
	switch rec.Kind {
	case trace.KindVMAdd:
		if v != nil {
			return fmt.Errorf("VM %d: %w", rec.VM, vasmon.ErrVMExists)
		}
		v = &VM{ID: rec.VM, Mem: guestmem.New(rec.RAM), Roots: make(map[uint64]*vasmon.Root),
			prot: &protector{pages: make(map[uint64]struct{})}, esz: 8}
		if rec.RAM <= maxVersioned {
			v.Ver = guestmem.NewVersions(rec.RAM)
			v.prot.ver = v.Ver
		}
		if err := p.host.AddVM(rec.VM, v.hostMemory(), v.prot, rec.MaxTables); err != nil {
			return fmt.Errorf("add VM %d: %w", rec.VM, err)
		}
		p.sum.Live[rec.VM] = v
		p.sum.VMs++
	case trace.KindVMRemove:
		if err := p.host.RemoveVM(p.ctx, rec.VM); err != nil {
			return fmt.Errorf("remove VM %d: %w", rec.VM, err)
		}
		delete(p.sum.Live, rec.VM)
	case trace.KindRootStart:
		req := p.opts.Request
		mon, opts := req.Monitored, req.Options
		if p.opts.AsRecorded {
			mon, opts = rec.Monitored, rec.Opts
		}
		name := rec.Name
		if name == "" {
			name = fmt.Sprintf("vm%d/cr3 %#x", rec.VM, rec.CR3)
		}
		info := &backends.RootInfo{VM: rec.VM, CR3: rec.CR3, Mode: rec.Mode, Name: name}
		if s, ok := p.host.(syncer); ok {
			if err := s.Sync(p.ctx); err != nil {
				return err
			}
		}
		root, err := p.host.Start(p.ctx, rec.VM, rec.CR3, rec.Mode, mon, req.Callback, info, opts)
		if err != nil {
			return fmt.Errorf("start root %#x (%v) of VM %d: %w", rec.CR3, rec.Mode, rec.VM, err)
		}
		v.Roots[rec.CR3] = root
		v.esz = rec.Mode.EntryBytes()
		p.sum.Roots++
		if p.opts.OnStart != nil {
			p.opts.OnStart(root, v.Mem)
		}
	case trace.KindRootStop:
		root := v.Roots[rec.CR3]
		if root == nil {
			p.sum.Skipped++
			p.sum.SkippedNoRoot++
			return errSkipped
		}
		delete(v.Roots, rec.CR3)
		if err := p.host.Stop(p.ctx, root); err != nil {
			return fmt.Errorf("stop root %#x of VM %d: %w", rec.CR3, rec.VM, err)
		}
	}
	return nil
}

// syncer is a host that can wait until the events submitted so far are
// processed (engine.Engine).
type syncer interface{ Sync(context.Context) error }

// page writes a Page record's content to memory; if the page is protected,
// word by word, each a trapped store submitted as a write (see the package
// comment). The protection is tested again after the memory is written.
func (p *player) page(v *VM, gpa uint64, data []byte) error {
	if v.Mem.Read(gpa, p.old[:]) != nil || bytes.Equal(p.old[:], data) {
		return nil
	}
	trapped := v.protected(gpa)
	if !trapped {
		_ = v.Mem.Write(gpa, data)
		if !v.protected(gpa) && !v.prot.has(gpa) {
			return nil
		}
	}
	p.sum.SyntheticPages++
	for i := 0; i < trace.PageSize; i += 8 {
		o, n := binary.LittleEndian.Uint64(p.old[i:]), binary.LittleEndian.Uint64(data[i:])
		if o == n {
			continue
		}
		var ver uint32
		a := gpa + uint64(i)
		switch {
		case trapped:
			ver, _, _ = v.write(a, 8, n)
		case v.Ver != nil:
			ver = v.Ver.Trap(a) // protected while the page was written
		}
		p.sum.Synthetic++
		if err := p.add(v.ID, shard.Event{GPA: a, Data: n, Size: 8, Ver: ver}); err != nil {
			return err
		}
	}
	return nil
}

// add queues an event of vm, submitting the batch first if it is of another
// VM, and after if it is full.
func (p *player) add(vm vasmon.VMID, ev shard.Event) error {
	if len(p.batch) > 0 && vm != p.bvm {
		if err := p.flush(); err != nil {
			return err
		}
	}
	p.bvm = vm
	p.batch = append(p.batch, ev)
	if len(p.batch) == cap(p.batch) {
		return p.flush()
	}
	return nil
}

// flush submits the pending batch. In the engine's non-blocking mode it
// retries what a full queue refused.
func (p *player) flush() error {
	b := p.batch
	p.batch = p.batch[:0]
	if p.opts.Sync && len(b) > 0 {
		return p.flushSync(b)
	}
	for len(b) > 0 {
		n, err := p.host.Submit(p.bvm, b)
		b = b[n:]
		if err == nil {
			return nil
		}
		if !errors.Is(err, engine.ErrOverload) {
			return fmt.Errorf("submit to VM %d: %w", p.bvm, err)
		}
		p.sum.Retried += int64(len(b))
		select {
		case <-p.ctx.Done():
			return p.ctx.Err()
		case <-time.After(50 * time.Microsecond):
		}
	}
	return nil
}

// flushSync submits b synchronously, one event at a time, through the VM's
// Syncer. In the engine's non-blocking mode it retries an event a full
// queue refused.
func (p *player) flushSync(b []shard.Event) error {
	sy := p.syncs[p.bvm]
	if sy == nil {
		var err error
		if sy, err = backends.NewSyncer(p.host, p.bvm); err != nil {
			return fmt.Errorf("synchronous submit to VM %d: %w", p.bvm, err)
		}
		if p.syncs == nil {
			p.syncs = make(map[vasmon.VMID]backends.Syncer)
		}
		p.syncs[p.bvm] = sy
	}
	for i := 0; i < len(b); {
		_, err := sy.Submit(b[i : i+1])
		if err == nil {
			i++
			continue
		}
		if !errors.Is(err, engine.ErrOverload) {
			return fmt.Errorf("synchronous submit to VM %d: %w", p.bvm, err)
		}
		p.sum.Retried++
		select {
		case <-p.ctx.Done():
			return p.ctx.Err()
		case <-time.After(50 * time.Microsecond):
		}
	}
	return nil
}

// protector is a VM's write protection: the set of protected pages, and
// their protected bits in the version words (if kept).
type protector struct {
	mu    sync.Mutex
	pages map[uint64]struct{}
	ver   *guestmem.Versions
}

func (p *protector) Protect(gpa uint64) error {
	gpa &^= trace.PageSize - 1
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.pages[gpa]; ok {
		return nil
	}
	p.pages[gpa] = struct{}{}
	if p.ver != nil {
		p.ver.SetProtected(gpa, true)
	}
	return nil
}

func (p *protector) Unprotect(gpa uint64) error {
	gpa &^= trace.PageSize - 1
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.pages[gpa]; !ok {
		return nil
	}
	delete(p.pages, gpa)
	if p.ver != nil {
		p.ver.SetProtected(gpa, false)
	}
	return nil
}

func (p *protector) has(gpa uint64) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.pages[gpa&^(trace.PageSize-1)]
	return ok
}

func (p *protector) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.pages)
}
