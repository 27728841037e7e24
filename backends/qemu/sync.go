package qemu

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/guestmem"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// Syncer submits one vCPU's trapped writes synchronously: engine.Syncer's
// methods (Submit returns once the writes' closure is done, with their
// callbacks' verdict).
type Syncer interface {
	Submit(evs []shard.Event) (shard.Verdict, error)
	Close()
}

var _ Syncer = (*engine.Syncer)(nil)

// ErrNoSync is returned for Config.Sync when neither Config.NewSyncer nor
// the host can submit synchronously.
var ErrNoSync = errors.New("qemu: Config.Sync: the host cannot submit synchronously (give Config.NewSyncer)")

// newSyncer returns the synchronous submitter of vm: Config.NewSyncer's,
// else the host's own (an *engine.Engine).
func newSyncer(cfg *Config, host engine.Host, vm vasmon.VMID) (Syncer, error) {
	if cfg.NewSyncer != nil {
		return cfg.NewSyncer(vm)
	}
	if h, ok := host.(interface {
		NewSyncer(vasmon.VMID) (*engine.Syncer, error)
	}); ok {
		return h.NewSyncer(vm)
	}
	return nil, fmt.Errorf("%w: %T", ErrNoSync, host)
}

// pages is the backend's own view of the pages the engine protects, for
// synchronous delivery and window counting:
//
//   - shadows: in sync mode, a copy of every protected page, kept up to
//     date from the records in ring order, so that a denied store's entry
//     can be put back to its value before the store (the plugin runs after
//     the store and cannot read it). The copy is taken when the page is
//     protected, with the page's version word unchanged across it: records
//     stamped up to that count are in the copy (their old value is not
//     known: such a store cannot be reverted), later ones are applied to it.
//   - windows (Config.Windows): window records of a page the engine hooks
//     afterwards, counted once the page is protected.
type pages struct {
	mu      sync.Mutex
	ram     *ram
	vers    *guestmem.Versions
	sync    bool
	shadow  map[uint64]*shadowPage // by page GPA (sync)
	linked  []uint64               // bitmap by page: an entry record linked it since it was last protected (windows)
	pending map[uint64]int         // window records of linked, unprotected pages, by page GPA
	windows atomic.Uint64          // window records of pages protected later
	// starting is set while a root found by sampling is started with the
	// vCPUs stopped (startStopped): the pages it protects were linked
	// where the plugin saw no record, and stores into them before are no
	// windows (a page mapped as data by an earlier record is marked linked
	// too).
	starting bool
}

type shadowPage struct {
	e    [vasmon.PageSize / 8]uint64
	seen uint32 // the page's change count the copy is as of
}

func newPages(m *ram, v *guestmem.Versions, sync, windows bool) *pages {
	p := &pages{ram: m, vers: v, sync: sync}
	if sync {
		p.shadow = make(map[uint64]*shadowPage)
	}
	if windows {
		p.pending = make(map[uint64]int)
		p.linked = make([]uint64, (v.Pages()+63)/64)
	}
	return p
}

// protect sets or clears the protected bit of the page at gpa (see
// control.protect) and keeps the page's shadow and window count.
func (p *pages) protect(gpa uint64, on bool) {
	if p.shadow == nil && p.pending == nil {
		p.vers.SetProtected(gpa, on)
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.vers.SetProtected(gpa, on)
	if p.pending != nil && on {
		if n := p.pending[gpa]; n > 0 {
			if !p.starting {
				p.windows.Add(uint64(n))
			}
			delete(p.pending, gpa)
		}
		p.setLinked(gpa, false)
	}
	if p.shadow == nil {
		return
	}
	if !on {
		delete(p.shadow, gpa)
		return
	}
	sp := p.shadow[gpa]
	if sp == nil {
		sp = new(shadowPage)
		p.shadow[gpa] = sp
	}
	// A held vCPU stores nothing more, so this ends once every vCPU
	// storing into the page is held (at most one round each).
	for {
		w0 := p.vers.Load(gpa)
		for i := range sp.e {
			sp.e[i] = p.ram.word(gpa + uint64(i)*8)
		}
		w1 := p.vers.Load(gpa)
		if guestmem.Count(w0) == guestmem.Count(w1) && guestmem.Stable(w1) {
			sp.seen = guestmem.Count(w1)
			return
		}
	}
}

// setStarting sets or clears starting.
func (p *pages) setStarting(on bool) {
	p.mu.Lock()
	p.starting = on
	p.mu.Unlock()
}

// apply returns the value before the store of the entry record r and
// applies r to the page's shadow; known is false if it cannot tell.
func (p *pages) apply(r *record) (old uint64, known bool) {
	page := r.GPA &^ (vasmon.PageSize - 1)
	p.mu.Lock()
	defer p.mu.Unlock()
	sp := p.shadow[page]
	if sp == nil || !guestmem.After(r.Ver, sp.seen) {
		return 0, false
	}
	i := r.GPA % vasmon.PageSize / 8
	old, sp.e[i] = sp.e[i], r.Val
	return old, true
}

// set records that the backend itself wrote v into the entry at gpa.
func (p *pages) set(gpa, v uint64) {
	p.mu.Lock()
	if sp := p.shadow[gpa&^(vasmon.PageSize-1)]; sp != nil {
		sp.e[gpa%vasmon.PageSize/8] = v
	}
	p.mu.Unlock()
}

// link notes that an entry record holds v: the page it points to is
// linked, and its earlier window records were stores into it as something
// else.
func (p *pages) link(v uint64) {
	page := v & 0x000FFFFFFFFFF000
	if v&vasmon.BitP == 0 || v&vasmon.BitPS != 0 || page/vasmon.PageSize >= uint64(len(p.linked))*64 {
		return
	}
	p.mu.Lock()
	delete(p.pending, page)
	p.setLinked(page, true)
	p.mu.Unlock()
}

func (p *pages) setLinked(page uint64, on bool) {
	pfn := page / vasmon.PageSize
	if pfn >= uint64(len(p.linked))*64 {
		return
	}
	if on {
		p.linked[pfn/64] |= 1 << (pfn % 64)
	} else {
		p.linked[pfn/64] &^= 1 << (pfn % 64)
	}
}

// window counts the window record r: at once if its page has been
// protected since the store (its change count moved on, the page
// protected), else when the page is protected. Only a page linked by an
// entry record since it was last protected counts: a table hooked by a
// root's Start, or through a table filled before its link, was linked
// where the plugin saw no record (a store into it then is no window of a
// link the engine was told of).
func (p *pages) window(r *record) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pfn := r.GPA / vasmon.PageSize
	if pfn >= uint64(len(p.linked))*64 || p.linked[pfn/64]&(1<<(pfn%64)) == 0 {
		return
	}
	w := p.vers.Load(r.GPA)
	if w&guestmem.VerProtected != 0 && guestmem.After(guestmem.Count(w), r.Ver) {
		p.windows.Add(1)
		p.setLinked(r.GPA, false)
		return
	}
	p.pending[r.GPA]++
}

// adBits are the Accessed and Dirty bits, which QEMU's MMU sets without a
// store callback.
const adBits = 1<<5 | 1<<6

// revert puts old back into the entry at gpa, which the denied store left
// holding cur (give or take A/D bits the MMU set since), as a trapped write
// of the backend: it returns the write's stamp, or 0 if the entry changed
// otherwise meanwhile (nothing written).
func (p *pages) revert(gpa, cur, old uint64) uint32 {
	w := (*uint64)(unsafe.Pointer(&p.ram.buf[gpa&^7]))
	s := p.vers.BeginWrite(gpa)
	for {
		v := atomic.LoadUint64(w)
		if v&^adBits != cur&^adBits {
			s = 0
			break
		}
		if atomic.CompareAndSwapUint64(w, v, old) {
			break
		}
	}
	// Ended before the shadow is touched: protect holds p.mu while it
	// waits for the page's writes to end.
	p.vers.EndWrite(gpa)
	if s != 0 {
		p.set(gpa, old)
	}
	return s
}
