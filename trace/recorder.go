package trace

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// Recorder is an engine.Host that records what a backend does to the host it
// wraps, delegating every call. Records describe completed operations:
//
//   - AddVM, RemoveVM, Start and Stop are recorded (VMAdd, VMRemove,
//     RootStart, RootStop) once the host has done them; calls that fail are
//     not recorded. A root's name is recorded when its callback context is a
//     *backends.RootInfo.
//   - Submit records the events the host accepted (the prefix evs[:n]),
//     after the host queued them: the events of one call are contiguous, in
//     order, and calls the backend serializes (as it must for writes to one
//     entry) keep their order. An event's time is its Trap (or the
//     recording time if Trap is 0). Events of a size outside 1..8 (which
//     the engine ignores) are not recorded.
//   - The Protector given to the host is wrapped: when the engine protects a
//     page (it is about to read it as a table), the wrapper protects it, then
//     records a Page record of its content read from the VM's memory. The
//     read follows the protection, as the engine's own does, so no write
//     falls between the copy and the protection unrecorded. Page adds a page
//     on the backend's initiative. The memory is given to the host as it
//     is, with its version words if it has them (vasmon.Versioned), and
//     the events with their stamps; the stamps are not recorded (a replay
//     stamps its own stores: FORMAT.md).
//
// The Recorder is safe for concurrent use: records are encoded under one
// mutex, never held while calling the host (the host's workers call Protect,
// so holding it would deadlock a blocking Submit). Full blocks are written
// under the mutex, so a slow writer slows producers and the engine's hooks.
//
// Write errors are sticky and stop the recording (not the delegation); Err
// and Close report them. Close writes the last block and the end record.
type Recorder struct {
	host  engine.Host
	start int64 // shard.Now() at Header.Start

	mu     sync.Mutex
	w      *Writer
	err    error
	closed bool
	mems   map[vasmon.VMID]vasmon.Memory
	rec    Record
	page   [PageSize]byte
}

var _ engine.Host = (*Recorder)(nil)

// NewRecorder writes a trace header to w and returns a Recorder of the calls
// made to host. Errors writing the header are reported by Err and Close.
func NewRecorder(w io.Writer, host engine.Host) *Recorder {
	r := &Recorder{host: host, mems: make(map[vasmon.VMID]vasmon.Memory)}
	start := time.Now()
	r.start = shard.Now()
	r.w, r.err = NewWriter(w, Header{Start: start})
	return r
}

// Err returns the first error writing the trace.
func (r *Recorder) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

// Close ends the trace: it writes the buffered records and the end record.
// It does not close the host or the writer. Calls made afterwards are
// delegated without being recorded.
func (r *Recorder) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.closed && r.err == nil {
		r.err = r.w.Close()
	}
	r.closed = true
	return r.err
}

// Flush writes the records buffered so far as a block (a trace cut short
// by a crash keeps every block written). Blocks are otherwise written when
// full (64 KiB).
func (r *Recorder) Flush() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.closed && r.err == nil {
		r.err = r.w.Flush()
	}
	return r.err
}

// Bytes returns the number of trace bytes written so far.
func (r *Recorder) Bytes() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.w == nil {
		return 0
	}
	return r.w.Offset()
}

// begin locks the recorder and returns the reusable record, or nil (unlocked)
// if nothing can be recorded.
func (r *Recorder) begin(kind Kind, vm vasmon.VMID) *Record {
	r.mu.Lock()
	if r.closed || r.err != nil {
		r.mu.Unlock()
		return nil
	}
	r.rec = Record{Kind: kind, VM: vm, Time: shard.Now() - r.start}
	return &r.rec
}

// commit writes the record and unlocks.
func (r *Recorder) commit(rec *Record) {
	if err := r.w.Write(rec); err != nil && r.err == nil {
		r.err = err
	}
	r.mu.Unlock()
}

// AddVM implements engine.Host.
func (r *Recorder) AddVM(id vasmon.VMID, mem vasmon.Memory, prot vasmon.Protector, maxTables int64) error {
	if mem == nil || prot == nil {
		return r.host.AddVM(id, mem, prot, maxTables)
	}
	if err := r.host.AddVM(id, mem, &protector{r: r, vm: id, mem: mem, inner: prot}, maxTables); err != nil {
		return err
	}
	if rec := r.begin(KindVMAdd, id); rec != nil {
		r.mems[id] = mem
		rec.RAM, rec.MaxTables = ramSize(mem), maxTables
		r.commit(rec)
	}
	return nil
}

// ramSize returns the size of guest RAM: mem's Size method if it has one,
// else the longest [0, n) that InRAM accepts.
func ramSize(mem vasmon.Memory) uint64 {
	if s, ok := mem.(interface{ Size() uint64 }); ok {
		return s.Size()
	}
	lo, hi := uint64(0), uint64(1)<<63 // InRAM(0, lo) holds; InRAM(0, hi) is assumed not to
	for hi-lo > 1 {
		mid := lo + (hi-lo)/2
		if mem.InRAM(0, mid) {
			lo = mid
		} else {
			hi = mid
		}
	}
	return lo
}

// RemoveVM implements engine.Host.
func (r *Recorder) RemoveVM(ctx context.Context, id vasmon.VMID) error {
	if err := r.host.RemoveVM(ctx, id); err != nil {
		return err
	}
	if rec := r.begin(KindVMRemove, id); rec != nil {
		delete(r.mems, id)
		r.commit(rec)
	}
	return nil
}

// Start implements engine.Host.
func (r *Recorder) Start(ctx context.Context, vm vasmon.VMID, cr3 uint64, mode vasmon.Mode, monitored uint64,
	cb vasmon.Callback, cbctx any, opts engine.RootOptions) (*vasmon.Root, error) {
	root, err := r.host.Start(ctx, vm, cr3, mode, monitored, cb, cbctx, opts)
	if err != nil {
		return root, err
	}
	if rec := r.begin(KindRootStart, vm); rec != nil {
		rec.CR3, rec.Mode, rec.Monitored, rec.Opts = cr3, mode, monitored, opts
		if info, ok := cbctx.(*backends.RootInfo); ok && info != nil {
			rec.Name = info.Name[:min(len(info.Name), MaxName)]
		}
		r.commit(rec)
	}
	return root, nil
}

// Stop implements engine.Host. A stop cut short by ctx is recorded: the
// engine completes it in the background.
func (r *Recorder) Stop(ctx context.Context, root *vasmon.Root) error {
	err := r.host.Stop(ctx, root)
	if root == nil || err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	if rec := r.begin(KindRootStop, root.VM.ID); rec != nil {
		rec.CR3 = root.CR3
		r.commit(rec)
	}
	return err
}

// Submit implements engine.Host.
func (r *Recorder) Submit(vm vasmon.VMID, evs []shard.Event) (int, error) {
	n, err := r.host.Submit(vm, evs)
	if n == 0 {
		return n, err
	}
	rec := r.begin(KindEvent, vm)
	if rec == nil {
		return n, err
	}
	now := rec.Time
	for i := range evs[:n] {
		ev := &evs[i]
		if ev.Size < 1 || ev.Size > 8 {
			continue
		}
		*rec = Record{Kind: KindEvent, VM: vm, Time: now, GPA: ev.GPA, Size: ev.Size, Data: ev.Data,
			HasOld: ev.HasOld, RIP: ev.RIP}
		if ev.HasOld {
			rec.Old = ev.Old
		}
		if ev.Trap != 0 {
			rec.Time = ev.Trap - r.start
		}
		if werr := r.w.Write(rec); werr != nil {
			r.err = werr
			break
		}
	}
	r.mu.Unlock()
	return n, err
}

// Page records the current content of the page holding gpa of a VM added
// through the recorder, for a backend that knows the engine will read it.
func (r *Recorder) Page(vm vasmon.VMID, gpa uint64) error {
	r.mu.Lock()
	mem := r.mems[vm]
	r.mu.Unlock()
	if mem == nil {
		return fmt.Errorf("trace: page of VM %d: %w", vm, vasmon.ErrUnknownVM)
	}
	return r.recordPage(vm, mem, gpa&^(PageSize-1))
}

// recordPage reads the page under the mutex, so that an event recorded
// before the page was written to memory before the read.
func (r *Recorder) recordPage(vm vasmon.VMID, mem vasmon.Memory, gpa uint64) error {
	rec := r.begin(KindPage, vm)
	if rec == nil {
		return nil
	}
	if err := mem.Read(gpa, r.page[:]); err != nil {
		r.mu.Unlock()
		return err
	}
	rec.GPA, rec.Page = gpa, r.page[:]
	r.commit(rec)
	return nil
}

// protector records the content of each page it protects.
type protector struct {
	r     *Recorder
	vm    vasmon.VMID
	mem   vasmon.Memory
	inner vasmon.Protector
}

func (p *protector) Protect(gpa uint64) error {
	if err := p.inner.Protect(gpa); err != nil {
		return err
	}
	// A page outside RAM is not recorded; the engine's read fails too.
	_ = p.r.recordPage(p.vm, p.mem, gpa)
	return nil
}

func (p *protector) Unprotect(gpa uint64) error { return p.inner.Unprotect(gpa) }
