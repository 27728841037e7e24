package guestmem

import (
	"sync/atomic"
	"unsafe"
)

// Versions is the version word of every 4 KiB page of a guest: the
// sequence-lock with which a backend tells an engine whether guest memory
// changed under a read.
//
// A page's word holds, from bit 0:
//
//   - bit 0: the page is write-protected (its writes trap);
//   - bits 1..15: trapped writes of the page in progress (begun, not ended);
//   - bits 32..63: the page's change count, a 32-bit serial number that
//     grows by one when a trapped write begins, when it ends and when the
//     page's protection changes.
//
// A backend that traps a write of a protected page calls BeginWrite before
// it applies the write to guest memory and EndWrite after; the count that
// BeginWrite returns stamps the write's event. A reader that loads a word
// with no write in progress, reads the page, and loads the same word again,
// has read a state of the page that includes every write stamped with a
// count up to the word's and none after it. Protect and Unprotect count as
// changes too, so a word unchanged across a read also proves the page stayed
// protected (every write of it trapped) all along.
//
// Versions covers [0, Size) of guest-physical memory with one 8-byte word
// per page (0.2% of guest RAM) and is safe for concurrent use; no method
// allocates or blocks. A backend whose trapped writes are seen only after
// they reached memory (a QEMU TCG plugin's memory callback) calls
// BeginWrite and EndWrite together after the store; readers then treat a
// write whose count is above their read as not in it, though it is, and
// re-apply it: the engine's confirmation against guest memory makes that
// harmless (see package vasmon).
type Versions struct {
	w []atomic.Uint64
}

// Fields of a version word.
const (
	VerProtected uint64 = 1
	verWriter    uint64 = 1 << 1
	verWriters   uint64 = 0x7FFF << 1
	verCount     uint64 = 1 << 32
)

// NewVersions returns the version words of a guest of size bytes, all zero:
// no page protected, no change counted.
func NewVersions(size uint64) *Versions {
	return &Versions{w: make([]atomic.Uint64, (size+pageSize-1)/pageSize)}
}

// VersionsOver returns Versions kept in words, which the caller owns and may
// share with another process (a shared-memory mapping): one 8-byte,
// 8-byte-aligned word per guest page.
func VersionsOver(words []uint64) *Versions {
	return &Versions{w: unsafe.Slice((*atomic.Uint64)(unsafe.Pointer(unsafe.SliceData(words))), len(words))}
}

// Pages returns the number of pages covered.
func (v *Versions) Pages() int { return len(v.w) }

func (v *Versions) word(gpa uint64) *atomic.Uint64 {
	pfn := gpa / pageSize
	if pfn >= uint64(len(v.w)) {
		return nil
	}
	return &v.w[pfn]
}

// Load returns the version word of the page holding gpa; 0 (unprotected,
// never changed) for a page outside the covered memory.
func (v *Versions) Load(gpa uint64) uint64 {
	if w := v.word(gpa); w != nil {
		return w.Load()
	}
	return 0
}

// Word returns the version word of the page holding gpa, or nil outside the
// covered memory, for callers that load it repeatedly.
func (v *Versions) Word(gpa uint64) *atomic.Uint64 { return v.word(gpa) }

// BeginWrite marks a trapped write of the page holding gpa as in progress
// and returns its stamp: the page's change count after it, never 0.
func (v *Versions) BeginWrite(gpa uint64) uint32 {
	w := v.word(gpa)
	if w == nil {
		return 0
	}
	n := w.Add(verCount + verWriter)
	for Count(n) == 0 { // a count of 0 means "no stamp": skip it on wrap-around
		n = w.Add(verCount)
	}
	return Count(n)
}

// EndWrite ends a trapped write begun by BeginWrite.
func (v *Versions) EndWrite(gpa uint64) {
	if w := v.word(gpa); w != nil {
		w.Add(verCount - verWriter)
	}
}

// Trap begins and ends a write at once and returns its stamp, for a
// backend that learns of the write only after it reached memory.
func (v *Versions) Trap(gpa uint64) uint32 {
	s := v.BeginWrite(gpa)
	v.EndWrite(gpa)
	return s
}

// SetProtected records that the page holding gpa is, or is no longer,
// write-protected; it counts as a change.
func (v *Versions) SetProtected(gpa uint64, on bool) {
	w := v.word(gpa)
	if w == nil {
		return
	}
	for {
		o := w.Load()
		n := o&^VerProtected + verCount
		if on {
			n |= VerProtected
		}
		if w.CompareAndSwap(o, n) {
			return
		}
	}
}

// Protected reports whether the page holding gpa is write-protected.
func (v *Versions) Protected(gpa uint64) bool { return v.Load(gpa)&VerProtected != 0 }

// Count returns the change count of a version word.
func Count(word uint64) uint32 { return uint32(word >> 32) }

// Stable reports whether no write of the page is in progress in word.
func Stable(word uint64) bool { return word&verWriters == 0 }

// After reports whether serial count a is after b (32-bit serial number
// arithmetic: correct while the two are less than 2^31 changes apart).
func After(a, b uint32) bool { return int32(a-b) > 0 }
