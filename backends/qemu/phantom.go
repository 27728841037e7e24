package qemu

import (
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// Phantom callbacks (SEMANTICS.md section 6, "No phantoms"): every callback
// must have been true in the guest at some instant. A real guest gives no
// ground truth to check that against, but Linux x86-64 writes no present
// entry that maps or links a frame outside guest RAM, or that sets bits
// reserved at its level, into the user half of an address space: a
// callback reporting such an entry shows data the engine took for an entry
// (a table page freed, reused and read after the fact). The backend counts
// them (GuestStats.Phantoms); they must stay 0. The check sees only the
// phantoms that look like no entry at all, a lower bound.

// Legacy hole of the pc machine: VGA memory and BIOS ROMs, not RAM.
const holeStart, holeEnd = 0xA0000, 0x100000

// CheckEntry returns why entry e, reported as the new entry of a mapping of
// size bytes in a root of mode on a guest with ramBytes of RAM from GPA 0,
// cannot have been written by Linux, or "" if it can. Entries that are not
// present are always plausible.
func CheckEntry(mode vasmon.Mode, ramBytes, e, size uint64) string {
	level := 0
	for l := 1; l <= mode.Levels(); l++ {
		if mode.EntrySpan(l) == size {
			level = l
		}
	}
	if level == 0 {
		return fmt.Sprintf("no level maps %#x bytes", size)
	}
	span := uint64(vasmon.PageSize)
	switch mode.Classify(e, level) {
	case vasmon.KindNone:
		return ""
	case vasmon.KindReserved:
		return fmt.Sprintf("PS set at level %d", level)
	case vasmon.KindLeaf:
		span = size
		if level > 1 {
			// Address bits below the large page's frame other than PAT
			// (bit 12) are reserved.
			if low := mode.TableAddr(e) & (span - 1) &^ (1 << 12); low != 0 {
				return fmt.Sprintf("reserved bits %#x set in a level-%d leaf", low, level)
			}
		}
	}
	frame := mode.TableAddr(e) &^ (span - 1)
	if frame >= ramBytes || span > ramBytes-frame || (frame < holeEnd && frame+span > holeStart) {
		return fmt.Sprintf("frame %#x+%#x outside guest RAM (%#x bytes)", frame, span, ramBytes)
	}
	return ""
}

// PhantomCall is a callback found impossible by CheckEntry.
type PhantomCall struct {
	Root               string
	VA, Old, New, Size uint64
	Why                string
}

func (p PhantomCall) String() string {
	return fmt.Sprintf("%s va=%#x old=%#x new=%#x size=%#x: %s", p.Root, p.VA, p.Old, p.New, p.Size, p.Why)
}

// phantoms counts a guest's phantom callbacks and keeps the first few.
type phantoms struct {
	ramBytes uint64
	present  atomic.Uint64 // callbacks with a present new entry: checked
	n        atomic.Uint64 // of which phantoms
	mu       sync.Mutex
	first    []PhantomCall
}

const phantomsKept = 8

// check returns cb preceded by the check of each callback's new entry. The
// callback context is the root's *backends.RootInfo.
func (p *phantoms) check(cb vasmon.Callback) vasmon.Callback {
	return func(ctx any, va, old, new, size uint64) {
		p.checkOne(ctx, va, old, new, size)
		cb(ctx, va, old, new, size)
	}
}

// checkVerdict is check for a verdict callback (engine.RootOptions.Verdict,
// called instead of the callback).
func (p *phantoms) checkVerdict(cb shard.VerdictCallback) shard.VerdictCallback {
	return func(ctx any, va, old, new, size uint64) shard.Verdict {
		p.checkOne(ctx, va, old, new, size)
		return cb(ctx, va, old, new, size)
	}
}

func (p *phantoms) checkOne(ctx any, va, old, new, size uint64) {
	if new&vasmon.BitP != 0 {
		p.present.Add(1)
		if info, ok := ctx.(*backends.RootInfo); ok {
			if why := CheckEntry(info.Mode, p.ramBytes, new, size); why != "" {
				p.add(PhantomCall{Root: info.Name, VA: va, Old: old, New: new, Size: size, Why: why})
			}
		}
	}
}

func (p *phantoms) add(c PhantomCall) {
	p.n.Add(1)
	p.mu.Lock()
	if len(p.first) < phantomsKept {
		p.first = append(p.first, c)
	}
	p.mu.Unlock()
}

// Phantoms returns the first phantom callbacks of the guest (at most 8;
// GuestStats.Phantoms counts them all).
func (g *Guest) Phantoms() []PhantomCall {
	g.phantoms.mu.Lock()
	defer g.phantoms.mu.Unlock()
	return append([]PhantomCall(nil), g.phantoms.first...)
}
