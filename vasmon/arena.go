package vasmon

// arena is a slab of T in fixed-size chunks with a free list. Handles are
// 1-based uint32 (0 is nil). Chunks are never moved or freed, so growth
// copies nothing and, after warm-up, alloc/release allocate nothing.
type arena[T any] struct {
	chunks [][]T
	free   []uint32
	next   uint32 // next never-used handle
	live   int
	chunk  uint32 // items per chunk (power of two)
	shift  uint
}

func newArena[T any](chunkBits uint) arena[T] {
	return arena[T]{chunk: 1 << chunkBits, shift: chunkBits, next: 1}
}

func (a *arena[T]) at(h uint32) *T {
	return &a.chunks[h>>a.shift][h&(a.chunk-1)]
}

func (a *arena[T]) alloc() uint32 {
	a.live++
	if n := len(a.free); n > 0 {
		h := a.free[n-1]
		a.free = a.free[:n-1]
		return h
	}
	h := a.next
	if int(h>>a.shift) == len(a.chunks) {
		a.chunks = append(a.chunks, make([]T, a.chunk))
	}
	a.next++
	return h
}

// release zeroes the item and puts its handle on the free list.
func (a *arena[T]) release(h uint32) {
	var zero T
	*a.at(h) = zero
	a.free = append(a.free, h)
	a.live--
}

// bytes returns the host memory held by the arena's chunks and free list.
func (a *arena[T]) bytes(itemSize uintptr) uintptr {
	return uintptr(len(a.chunks))*uintptr(a.chunk)*itemSize + uintptr(cap(a.free))*4
}

// ensure grows the arena's chunks to hold handle h, for an arena indexed by
// another arena's handles.
func (a *arena[T]) ensure(h uint32) {
	for int(h>>a.shift) >= len(a.chunks) {
		a.chunks = append(a.chunks, make([]T, a.chunk))
	}
}
