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
	"github.com/vasengine/vasengine/engine"
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
