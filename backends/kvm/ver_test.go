package kvm

import (
	"context"
	"sync"
	"testing"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/guestmem"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// stampHost is an engine.Host in front of an engine that keeps, per page,
// the protection changes made through the VM's protector and the stamps of
// the events submitted, and the memory the VM was added with.
type stampHost struct {
	*engine.Engine
	mu       sync.Mutex
	mem      vasmon.Memory
	changes  map[uint64]uint32   // successful Protect and Unprotect calls
	stamps   map[uint64][]uint32 // Ver of each event, in submission order
	unstamps int                 // events without a stamp
}

type stampProt struct {
	h     *stampHost
	inner vasmon.Protector
}

func (p stampProt) Protect(gpa uint64) error   { return p.h.change(gpa, p.inner.Protect(gpa)) }
func (p stampProt) Unprotect(gpa uint64) error { return p.h.change(gpa, p.inner.Unprotect(gpa)) }

func (h *stampHost) change(gpa uint64, err error) error {
	if err == nil {
		h.mu.Lock()
		h.changes[gpa]++
		h.mu.Unlock()
	}
	return err
}

func (h *stampHost) AddVM(id vasmon.VMID, mem vasmon.Memory, prot vasmon.Protector, max int64) error {
	h.mu.Lock()
	h.mem = mem
	h.mu.Unlock()
	return h.Engine.AddVM(id, mem, stampProt{h, prot}, max)
}

func (h *stampHost) Submit(id vasmon.VMID, evs []shard.Event) (int, error) {
	h.mu.Lock()
	for _, e := range evs {
		if e.Ver == 0 {
			h.unstamps++
		} else {
			pg := e.GPA &^ 4095
			h.stamps[pg] = append(h.stamps[pg], e.Ver)
		}
	}
	h.mu.Unlock()
	return h.Engine.Submit(id, evs)
}

// TestTrapStamps: in trap mode the engine reads the guest's memory with its
// version words (vasmon.Versioned), and every trapped write is counted on
// its page's word while the backend applies it: at the end, each page's
// change count is exactly one per protection change plus two per stamped
// event (BeginWrite, EndWrite), the stamps of a page's events grow in the
// order they were submitted, and no page is left protected or mid-write.
// In dirty mode, whose writes do not trap, the memory is not versioned.
func TestTrapStamps(t *testing.T) {
	requireKVM(t)
	e, err := engine.New(engine.Config{Shards: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	h := &stampHost{Engine: e, changes: map[uint64]uint32{}, stamps: map[uint64][]uint32{}}
	vm, err := NewVM(h, backends.Request{}, VMConfig{ID: 1, VCPUs: 2, Seed: 5, Iterations: iterations()})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close(context.Background())
	vmem, ok := h.mem.(vasmon.Versioned)
	if !ok {
		t.Fatalf("trap mode: the engine reads memory %T, without versions", h.mem)
	}
	if err := vm.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := e.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := vm.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	vs := vmem.Versions()
	h.mu.Lock()
	stamped := 0
	for gpa := uint64(0); gpa < ramSize; gpa += 4096 {
		w := vs.Load(gpa)
		st := h.stamps[gpa]
		stamped += len(st)
		if want := h.changes[gpa] + 2*uint32(len(st)); guestmem.Count(w) != want || !guestmem.Stable(w) || w&guestmem.VerProtected != 0 {
			t.Errorf("page %#x: version word %#x, want count %d (%d protection changes, %d stamped writes), stable, unprotected",
				gpa, w, want, h.changes[gpa], len(st))
		}
		for i := 1; i < len(st); i++ {
			if !guestmem.After(st[i], st[i-1]) {
				t.Errorf("page %#x: event %d stamped %d after one stamped %d", gpa, i, st[i], st[i-1])
				break
			}
		}
	}
	t.Logf("%d events stamped, %d unstamped; %d traps", stamped, h.unstamps, vm.Stats().Traps)
	if stamped == 0 || uint64(stamped+h.unstamps) != vm.Stats().Traps {
		t.Errorf("%d stamped and %d unstamped events for %d traps", stamped, h.unstamps, vm.Stats().Traps)
	}
	h.mu.Unlock()
	if err := DirtyRingSupported(); err == nil {
		d, err := NewVM(h, backends.Request{}, VMConfig{ID: 2, Mode: Dirty, Iterations: 1})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close(context.Background())
		h.mu.Lock()
		_, ok := h.mem.(vasmon.Versioned)
		h.mu.Unlock()
		if ok {
			t.Errorf("dirty mode: the engine reads memory %T, with versions its writes do not keep", h.mem)
		}
	}
}
