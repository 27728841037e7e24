package qemu

import "sync/atomic"

// SetUnversioned makes guests started afterwards give the engine their RAM
// without the plugin's version words (see unversioned); it returns the
// previous setting.
func SetUnversioned(on bool) (was bool) {
	was, unversioned = unversioned, on
	return was
}

// Mute makes the drainer stop consuming records (and answering holds), as
// a Go side that hangs would, or resume.
func (g *Guest) Mute(on bool) { g.muted.Store(on) }

// SetGoPID changes the process the plugin checks for life while it holds a
// vCPU.
func (g *Guest) SetGoPID(pid int) { atomic.StoreUint32(&g.ctl.hdr.GoPID, uint32(pid)) }

// SyncOn reports whether the plugin holds vCPUs.
func (g *Guest) SyncOn() bool { return atomic.LoadUint32(&g.ctl.hdr.Sync) != 0 }
