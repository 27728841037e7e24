package events

import (
	"github.com/vasengine/vasengine/vasmon"
)

// Record is one translation change as the pipeline carries it: built by a
// root's callback on the shard worker that invoked it, copied through the
// pipeline's rings and channels by value. It is fixed-size (80 bytes) and
// holds no pointer, so rings of records cost the garbage collector nothing.
// The host name and the root's names live in the Pipeline (Root indexes its
// table of roots).
type Record struct {
	VA   uint64 // first address of the mapping
	Old  uint64 // entry before the change (bit 0 clear: not present)
	New  uint64 // entry after the change
	Size uint64 // page size of the entry's level
	CR3  uint64 // the root's CR3
	// Seq numbers the records of one VM in the order the pipeline received
	// them, from 1 (set by the pipeline's lane, not by the callback).
	Seq uint64
	// Trap is when the write that caused the change was trapped, Unix
	// nanoseconds; 0: unknown. Records of roots started through Wrap's
	// host carry it (the engine's traced callback, RootOptions.Traced),
	// except roots with a verdict callback (its signature has no trap
	// time) and records made by Pipeline.AddRoot's plain callback.
	Trap int64
	Time int64 // when the callback ran, Unix nanoseconds (wall clock)
	VM   vasmon.VMID
	Root uint32 // index of the root in the pipeline's table (Pipeline.Root)
	Mode vasmon.Mode
	Kind Kind
	// Gained and Lost are the permissions the mapping gained and lost:
	// for a map, everything it grants is gained; for an unmap, lost.
	Gained, Lost Perm
	Flags        Flags
}

// Kind is the kind of a change.
type Kind uint8

// Kinds of change.
const (
	KindOther Kind = iota // both present, same frame and permissions (another monitored bit)
	KindMap               // not present -> present
	KindUnmap             // present -> not present
	KindRemap             // present -> present at another frame (permissions may change too)
	KindPerm              // present -> present, same frame, permissions changed
	KindSplit             // a large page replaced by a table of smaller ones
	KindMerge             // a table replaced by a large page
	numKinds
)

var kindNames = [numKinds]string{"other", "map", "unmap", "remap", "perm", "split", "merge"}

// String returns the kind's name as in the JSON schema.
func (k Kind) String() string {
	if k < numKinds {
		return kindNames[k]
	}
	return "other"
}

// Perm is a set of permissions of a present mapping.
type Perm uint8

// Permissions. R is implied by presence on x86 and not reported.
const (
	PermW Perm = 1 << iota // writable (RW)
	PermX                  // executable (NX clear)
	PermU                  // user-accessible (US)
)

// String returns the set as "WXU" letters in that order ("" for none).
func (p Perm) String() string {
	var b [3]byte
	n := 0
	for i, c := range "WXU" {
		if p&(1<<i) != 0 {
			b[n] = byte(c)
			n++
		}
	}
	return string(b[:n])
}

// Changes returns the gained and lost permissions as "+W -X"-style tokens,
// space-separated, W, X, U in that order, gains first.
func Changes(gained, lost Perm) string {
	var b []byte
	for _, s := range [2]struct {
		p    Perm
		sign byte
	}{{gained, '+'}, {lost, '-'}} {
		for i, c := range "WXU" {
			if s.p&(1<<i) != 0 {
				if len(b) > 0 {
					b = append(b, ' ')
				}
				b = append(b, s.sign, byte(c))
			}
		}
	}
	return string(b)
}

// Flags are facts about the record's root and address.
type Flags uint8

// Flags.
const (
	FlagKernel    Flags = 1 << iota // VA in the upper (kernel) half of the address space
	FlagFullSpace                   // the root monitors the kernel half too (vasmon.Options.FullSpace)
)

const (
	bitP  = vasmon.BitP
	bitRW = vasmon.BitRW
	bitUS = vasmon.BitUS
	bitPS = vasmon.BitPS
	bitNX = vasmon.BitNX
	// frameMask holds the frame address bits of every mode's entries (a
	// 32-bit mode's entries are zero above bit 31).
	frameMask = 0x000FFFFFFFFFF000
)

// PermOf returns the permissions of entry e (none if not present). In
// 32-bit paging there is no NX bit: every present page is executable.
func PermOf(e uint64) Perm {
	if e&bitP == 0 {
		return 0
	}
	p := PermX
	if e&bitNX != 0 {
		p = 0
	}
	if e&bitRW != 0 {
		p |= PermW
	}
	if e&bitUS != 0 {
		p |= PermU
	}
	return p
}

// frame returns the frame address of a leaf entry of size bytes (the low
// bits of a large page's frame field, PAT among them, are ignored).
func frame(e, size uint64) uint64 {
	m := uint64(frameMask)
	if size > 4096 {
		m &^= size - 1
	}
	return e & m
}

// Classify sets r's Kind, Gained and Lost from its Old, New and Size.
func (r *Record) Classify() {
	op, np := PermOf(r.Old), PermOf(r.New)
	r.Gained, r.Lost = np&^op, op&^np
	oldP, newP := r.Old&bitP != 0, r.New&bitP != 0
	switch {
	case !oldP && !newP:
		r.Kind = KindOther
	case !oldP:
		r.Kind = KindMap
	case !newP:
		r.Kind = KindUnmap
	case r.Size > 4096 && r.Old&bitPS != 0 && r.New&bitPS == 0:
		r.Kind = KindSplit
	case r.Size > 4096 && r.Old&bitPS == 0 && r.New&bitPS != 0:
		r.Kind = KindMerge
	case frame(r.Old, r.Size) != frame(r.New, r.Size):
		r.Kind = KindRemap
	case op != np:
		r.Kind = KindPerm
	default:
		r.Kind = KindOther
	}
}

// KernelHalf reports whether va lies in the upper half of mode's address
// space (where kernels map themselves).
func KernelHalf(mode vasmon.Mode, va uint64) bool {
	switch mode {
	case vasmon.Mode4:
		return va >= 1<<47
	case vasmon.Mode5:
		return va >= 1<<56
	default:
		return va >= 1<<31
	}
}
