// Package backends holds what every backend (sim, kvm, qemu, replay) shares:
// how the user's monitoring request reaches it. A backend owns its guests'
// memory and write protection, registers each guest with an engine.Host,
// starts monitoring the address spaces it discovers (with the request's
// bits, callback and options; the callback's context is a *RootInfo), and
// submits one shard.Event per trapped page-table write, stamped with the
// time of the trap (shard.Now), the entry's old value and the RIP when it
// knows them.
package backends

import (
	"errors"
	"fmt"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// Request is the user's monitoring request, the same for every backend.
type Request struct {
	Monitored uint64          // entry bits whose change is reported (P is implied)
	Callback  vasmon.Callback // called with a *RootInfo as its context
	Options   engine.RootOptions
}

// RootInfo is the callback context of a root a backend monitors.
type RootInfo struct {
	VM   vasmon.VMID
	CR3  uint64
	Mode vasmon.Mode
	Name string // backend's name for the address space ("vm3/pid 41")
}

// DefaultMonitored are the bits reported by default: presence (implied), the
// frame address and the permission bits RW, US and NX. Accessed/Dirty are
// left out: hardware sets them without a trap on every backend.
const DefaultMonitored = vasmon.BitRW | vasmon.BitUS | vasmon.BitNX | 0x000FFFFFFFFFF000

// Syncer submits one vCPU's trapped writes synchronously (SEMANTICS.md
// section 7; engine.Syncer): Submit returns once the writes' closure is done,
// with the verdict of their callbacks. On shard.Deny the backend does not
// let the store take effect: it puts the entry's old bytes back in guest
// memory and submits that restoring write through the same Syncer (its own
// verdict is not asked for: the restore always happens). A Syncer is used
// by one goroutine at a time.
type Syncer interface {
	Submit(evs []shard.Event) (shard.Verdict, error)
	Close()
}

// SyncHost is a Host wrapper that can submit synchronously (the trace
// recorder, the command line's host): it hands out Syncers of the engine
// it wraps.
type SyncHost interface {
	SyncSubmitter(vm vasmon.VMID) (Syncer, error)
}

// ErrNoSync is returned by NewSyncer for a host that cannot submit
// synchronously.
var ErrNoSync = errors.New("backends: the host cannot submit synchronously")

// NewSyncer returns a Syncer for the writes of vm on host: the engine's own
// (*engine.Engine, or a type embedding it), or the one a wrapper hands out
// (SyncHost).
func NewSyncer(host engine.Host, vm vasmon.VMID) (Syncer, error) {
	switch h := host.(type) {
	case interface {
		NewSyncer(vasmon.VMID) (*engine.Syncer, error)
	}: // the engine, or a type embedding it
		s, err := h.NewSyncer(vm)
		if err != nil {
			return nil, err
		}
		return s, nil
	case SyncHost:
		return h.SyncSubmitter(vm)
	}
	return nil, fmt.Errorf("%w (%T)", ErrNoSync, host)
}
