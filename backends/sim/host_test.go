package sim_test

import (
	"context"
	"sync"
	"sync/atomic"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// nullHost is an engine.Host that only counts (and hashes, per VM) the
// events it is given. With protectAll it write-protects every guest page
// at AddVM, so that every page-table store traps: the simulator alone, with
// a deterministic event stream.
type nullHost struct {
	protectAll bool
	events     atomic.Uint64
	ids        atomic.Uint32

	mu   sync.Mutex
	hash map[vasmon.VMID]uint64
	vms  map[vasmon.VMID]*vasmon.VM
}

func newNullHost(protectAll bool) *nullHost {
	return &nullHost{protectAll: protectAll, hash: map[vasmon.VMID]uint64{}, vms: map[vasmon.VMID]*vasmon.VM{}}
}

type sized interface{ Size() uint64 }

func (h *nullHost) AddVM(id vasmon.VMID, mem vasmon.Memory, prot vasmon.Protector, maxTables int64) error {
	if h.protectAll {
		for gpa := uint64(0); gpa < mem.(sized).Size(); gpa += vasmon.PageSize {
			if err := prot.Protect(gpa); err != nil {
				return err
			}
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.vms[id] != nil {
		return vasmon.ErrVMExists
	}
	h.vms[id] = vasmon.NewVM(id, mem, prot, maxTables)
	h.hash[id] = 14695981039346656037
	return nil
}

func (h *nullHost) RemoveVM(_ context.Context, id vasmon.VMID) error {
	h.mu.Lock()
	v := h.vms[id]
	delete(h.vms, id)
	h.mu.Unlock()
	if v == nil {
		return vasmon.ErrUnknownVM
	}
	if h.protectAll {
		for gpa := uint64(0); gpa < v.Mem.(sized).Size(); gpa += vasmon.PageSize {
			_ = v.Prot.Unprotect(gpa)
		}
	}
	return nil
}

func (h *nullHost) Start(_ context.Context, id vasmon.VMID, cr3 uint64, mode vasmon.Mode, monitored uint64,
	cb vasmon.Callback, cbctx any, opts engine.RootOptions) (*vasmon.Root, error) {
	h.mu.Lock()
	v := h.vms[id]
	h.mu.Unlock()
	if v == nil {
		return nil, vasmon.ErrUnknownVM
	}
	return vasmon.NewRoot(h.ids.Add(1), v, cr3, mode, monitored, cb, cbctx, opts.Options)
}

func (h *nullHost) Stop(context.Context, *vasmon.Root) error { return nil }

func (h *nullHost) Submit(id vasmon.VMID, evs []shard.Event) (int, error) {
	h.events.Add(uint64(len(evs)))
	h.mu.Lock()
	x := h.hash[id]
	for i := range evs {
		e := &evs[i]
		for _, w := range [...]uint64{e.GPA, e.Data, e.Old, e.RIP, uint64(e.Size)} {
			x = (x ^ w) * 1099511628211
		}
	}
	h.hash[id] = x
	h.mu.Unlock()
	return len(evs), nil
}

func (h *nullHost) hashes() map[vasmon.VMID]uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make(map[vasmon.VMID]uint64, len(h.hash))
	for k, v := range h.hash {
		out[k] = v
	}
	return out
}
