package vasmon

import "math/bits"

// hindex is an open-addressing hash index (linear probing, backward-shift
// deletion) from a 64-bit key hash to an arena handle. It stores 32 bits of
// the hash beside each handle, so a probe compares keys (through eq) only on
// a hash match. Lookups are O(1) expected whatever the number of entries.
type hindex struct {
	slots []hslot
	n     int
}

type hslot struct {
	h uint32 // hash bits; meaningless when v == 0
	v uint32 // handle; 0 = empty
}

// XXH64 primes.
const (
	xxPrime1 uint64 = 11400714785074694791
	xxPrime2 uint64 = 14029467366897019727
	xxPrime3 uint64 = 0x165667B19E3779F9
	xxPrime4 uint64 = 9650029242287828579
	xxPrime5 uint64 = 2870177450012600261
)

// hashKey is XXH64 (seed 0) of the 16 bytes of a then b, little-endian:
// the value xxhash.Sum64 gives for them (a test holds it to that), with the
// fixed-length steps written out, so no buffer is built and nothing loops.
func hashKey(a, b uint64) uint64 {
	h := xxPrime5 + 16
	h ^= xxRound(a)
	h = bits.RotateLeft64(h, 27)*xxPrime1 + xxPrime4
	h ^= xxRound(b)
	h = bits.RotateLeft64(h, 27)*xxPrime1 + xxPrime4
	h ^= h >> 33
	h *= xxPrime2
	h ^= h >> 29
	h *= xxPrime3
	h ^= h >> 32
	return h
}

func xxRound(lane uint64) uint64 {
	return bits.RotateLeft64(lane*xxPrime2, 31) * xxPrime1
}

func (x *hindex) find(h uint64, eq func(uint32) bool) uint32 {
	if len(x.slots) == 0 {
		return 0
	}
	mask := uint64(len(x.slots) - 1)
	for i := h & mask; ; i = (i + 1) & mask {
		s := x.slots[i]
		if s.v == 0 {
			return 0
		}
		if s.h == uint32(h) && eq(s.v) {
			return s.v
		}
	}
}

func (x *hindex) insert(h uint64, v uint32) {
	if (x.n+1)*4 > len(x.slots)*3 {
		x.grow()
	}
	x.put(h, v)
	x.n++
}

func (x *hindex) put(h uint64, v uint32) {
	mask := uint64(len(x.slots) - 1)
	i := h & mask
	for x.slots[i].v != 0 {
		i = (i + 1) & mask
	}
	x.slots[i] = hslot{h: uint32(h), v: v}
}

func (x *hindex) grow() {
	old := x.slots
	n := 2 * len(old)
	if n == 0 {
		n = 64
	}
	x.slots = make([]hslot, n)
	for _, s := range old {
		if s.v != 0 {
			x.put(uint64(s.h), s.v)
		}
	}
}

// remove deletes handle v stored under hash h.
func (x *hindex) remove(h uint64, v uint32) {
	mask := uint64(len(x.slots) - 1)
	i := h & mask
	for x.slots[i].v != v {
		if x.slots[i].v == 0 {
			return
		}
		i = (i + 1) & mask
	}
	// Backward-shift deletion keeps every probe sequence unbroken.
	for {
		x.slots[i] = hslot{}
		j := i
		for {
			j = (j + 1) & mask
			s := x.slots[j]
			if s.v == 0 {
				x.n--
				return
			}
			home := uint64(s.h) & mask
			// Move s into the hole at i unless its home lies in (i, j].
			if (j > i && (home <= i || home > j)) || (j < i && home <= i && home > j) {
				x.slots[i] = s
				i = j
				break
			}
		}
	}
}

func (x *hindex) bytes() uintptr { return uintptr(cap(x.slots)) * 8 }
