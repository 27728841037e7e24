package engine

import (
	"context"

	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// Host is what a backend drives: the Engine itself, or a wrapper of it (the
// trace recorder). Its methods have the Engine's contracts.
type Host interface {
	AddVM(id vasmon.VMID, mem vasmon.Memory, prot vasmon.Protector, maxTables int64) error
	RemoveVM(ctx context.Context, id vasmon.VMID) error
	Start(ctx context.Context, vm vasmon.VMID, cr3 uint64, mode vasmon.Mode, monitored uint64,
		cb vasmon.Callback, cbctx any, opts RootOptions) (*vasmon.Root, error)
	Stop(ctx context.Context, r *vasmon.Root) error
	Submit(vm vasmon.VMID, evs []shard.Event) (int, error)
}

var _ Host = (*Engine)(nil)
