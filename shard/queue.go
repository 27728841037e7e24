package shard

import (
	"math/bits"
	"sync/atomic"
)

// padSize separates the producer and consumer counters of a Ring. It is two
// 64-byte cache lines because x86 CPUs prefetch lines in adjacent pairs.
const padSize = 128

// A Ring is a bounded multi-producer multi-consumer FIFO queue of T values.
// Its methods never block and never allocate; a full or empty Ring is
// reported to the caller, who decides whether to retry, drop or yield.
//
// The algorithm is Dmitry Vyukov's bounded MPMC queue: every slot carries a
// sequence number that tells producers and consumers whose turn it is, so an
// operation is one compare-and-swap on a shared counter plus a copy of the
// value. A producer or consumer that is descheduled between claiming a slot
// and publishing it holds up the slots behind it: in that window TryDequeue
// may report an empty queue although later values are already stored, and
// TryEnqueue may report a full one. No value is lost or reordered.
//
// A dequeued slot keeps a copy of its value until it is overwritten; T is
// meant to be a small pointer-free record.
//
// A Ring must be created with NewRing and must not be copied after first use.
type Ring[T any] struct {
	_    [padSize]byte
	head atomic.Uint64 // next position to dequeue
	_    [padSize - 8]byte
	tail atomic.Uint64 // next position to enqueue
	_    [padSize - 8]byte
	mask uint64
	slot []ringSlot[T]
}

type ringSlot[T any] struct {
	// seq == pos: free for the producer of position pos.
	// seq == pos+1: holds the value of position pos.
	seq atomic.Uint64
	val T
}

// NewRing returns an empty Ring that holds at least capacity values. The
// capacity is rounded up to a power of two, and to at least 2. NewRing
// panics if capacity is not positive or too large to allocate.
func NewRing[T any](capacity int) *Ring[T] {
	if capacity < 1 || capacity > 1<<40 {
		panic("shard: NewRing: bad capacity")
	}
	n := uint64(1) << bits.Len64(uint64(capacity-1))
	if n < 2 {
		n = 2 // with one slot, "full" and "empty" have the same sequence number
	}
	r := &Ring[T]{mask: n - 1, slot: make([]ringSlot[T], n)}
	for i := range r.slot {
		r.slot[i].seq.Store(uint64(i))
	}
	return r
}

// Cap returns the number of values the Ring can hold.
func (r *Ring[T]) Cap() int { return len(r.slot) }

// Len returns the number of values in the Ring. It is exact only when no
// other goroutine is using the Ring; otherwise it is a snapshot that may be
// stale by the time it is returned.
func (r *Ring[T]) Len() int {
	head := r.head.Load()
	tail := r.tail.Load()
	if tail <= head {
		return 0
	}
	return int(min(tail-head, uint64(len(r.slot))))
}

// TryEnqueue appends v to the Ring and reports true, or reports false if
// the Ring is full.
func (r *Ring[T]) TryEnqueue(v T) bool {
	pos := r.tail.Load()
	for {
		s := &r.slot[pos&r.mask]
		switch seq := s.seq.Load(); {
		case seq == pos:
			if r.tail.CompareAndSwap(pos, pos+1) {
				s.val = v
				s.seq.Store(pos + 1)
				return true
			}
		case int64(seq-pos) < 0:
			// The slot still holds the value of position pos-Cap.
			return false
		}
		// Another producer took pos; try the current tail.
		pos = r.tail.Load()
	}
}

// TryDequeue removes and returns the oldest value in the Ring, or reports
// false if the Ring is empty.
func (r *Ring[T]) TryDequeue() (T, bool) {
	pos := r.head.Load()
	for {
		s := &r.slot[pos&r.mask]
		switch seq := s.seq.Load(); {
		case seq == pos+1:
			if r.head.CompareAndSwap(pos, pos+1) {
				v := s.val
				s.seq.Store(pos + r.mask + 1)
				return v, true
			}
		case int64(seq-(pos+1)) < 0:
			// No value has been published at pos yet.
			var zero T
			return zero, false
		}
		// Another consumer took pos; try the current head.
		pos = r.head.Load()
	}
}

// DequeueBatch removes up to len(dst) of the oldest values from the Ring,
// stores them in order at the start of dst and returns how many it stored.
// It returns 0 if the Ring is empty. The values are claimed with a single
// compare-and-swap, so a batch is a contiguous run of the queue even when
// several consumers call DequeueBatch or TryDequeue concurrently.
func (r *Ring[T]) DequeueBatch(dst []T) int {
	limit := uint64(min(len(dst), len(r.slot)))
	for {
		pos := r.head.Load()
		// Count the published values at pos, pos+1, ....
		var n uint64
		for n < limit && r.slot[(pos+n)&r.mask].seq.Load() == pos+n+1 {
			n++
		}
		if n == 0 {
			return 0
		}
		// Head is monotonic, so if it is still pos no other consumer has
		// taken any of the n values, and none can now.
		if !r.head.CompareAndSwap(pos, pos+n) {
			continue
		}
		for i := range n {
			s := &r.slot[(pos+i)&r.mask]
			dst[i] = s.val
			s.seq.Store(pos + i + r.mask + 1)
		}
		return int(n)
	}
}

// Claim takes up to max of the oldest values for the caller to read in
// place, with At(pos), ..., At(pos+n-1), and returns n (0 if the Ring is
// empty). The values are claimed with a single compare-and-swap, as by
// DequeueBatch, but their slots stay taken, and producers cannot reuse them,
// until the caller releases them with Release(pos, n). A consumer that
// processes values in place spares copying them out.
func (r *Ring[T]) Claim(max int) (pos uint64, n int) {
	limit := uint64(min(max, len(r.slot)))
	for {
		pos = r.head.Load()
		var k uint64
		for k < limit && r.slot[(pos+k)&r.mask].seq.Load() == pos+k+1 {
			k++
		}
		if k == 0 {
			return pos, 0
		}
		if r.head.CompareAndSwap(pos, pos+k) {
			return pos, int(k)
		}
	}
}

// At returns the value at position pos, claimed by the caller with Claim.
func (r *Ring[T]) At(pos uint64) *T { return &r.slot[pos&r.mask].val }

// Release frees the n slots from position pos, claimed with Claim, for the
// producers. The values must not be used afterwards.
func (r *Ring[T]) Release(pos uint64, n int) {
	for i := range uint64(n) {
		r.slot[(pos+i)&r.mask].seq.Store(pos + i + r.mask + 1)
	}
}

// TryEnqueueBatch appends a prefix of vs to the Ring as one contiguous run,
// claimed with a single compare-and-swap, and returns its length: 0 if the
// Ring is full, less than len(vs) if it has room for fewer.
func (r *Ring[T]) TryEnqueueBatch(vs []T) int {
	n, _ := r.tryEnqueueBatch(vs)
	return n
}

// tryEnqueueBatch is TryEnqueueBatch that also returns the position of the
// run's first value.
func (r *Ring[T]) tryEnqueueBatch(vs []T) (int, uint64) {
	if len(vs) == 0 {
		return 0, r.tail.Load()
	}
	limit := uint64(min(len(vs), len(r.slot)))
	for {
		pos := r.tail.Load()
		var n uint64
		for n < limit && r.slot[(pos+n)&r.mask].seq.Load() == pos+n {
			n++
		}
		if n == 0 {
			if seq := r.slot[pos&r.mask].seq.Load(); int64(seq-pos) < 0 {
				return 0, pos // the slot still holds the value of position pos-Cap
			}
			continue // another producer took pos
		}
		// Slots only become free in order of position for a given producer
		// claim, and none of pos..pos+n-1 can be claimed by anyone else
		// while tail is still pos.
		if !r.tail.CompareAndSwap(pos, pos+n) {
			continue
		}
		for i := range n {
			s := &r.slot[(pos+i)&r.mask]
			s.val = vs[i]
			s.seq.Store(pos + i + 1)
		}
		return int(n), pos
	}
}
