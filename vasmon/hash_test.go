package vasmon

import (
	"encoding/binary"
	"math/rand/v2"
	"testing"

	"github.com/cespare/xxhash/v2"
)

func xxhashRef(a, b uint64) uint64 {
	var buf [16]byte
	binary.LittleEndian.PutUint64(buf[:8], a)
	binary.LittleEndian.PutUint64(buf[8:], b)
	return xxhash.Sum64(buf[:])
}

// TestHashKeyIsXXH64: hashKey is xxhash.Sum64 of its two keys' bytes.
func TestHashKeyIsXXH64(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	keys := []uint64{0, 1, 1 << 63, ^uint64(0), 0x1234000}
	for i := 0; i < 1000; i++ {
		keys = append(keys, rng.Uint64())
	}
	for i, a := range keys {
		b := keys[(i*7+3)%len(keys)]
		if got, want := hashKey(a, b), xxhashRef(a, b); got != want {
			t.Fatalf("hashKey(%#x, %#x) = %#x, xxhash %#x", a, b, got, want)
		}
	}
}

func FuzzHashKey(f *testing.F) {
	f.Add(uint64(0), uint64(0))
	f.Add(uint64(7), uint64(0x80000))
	f.Fuzz(func(t *testing.T, a, b uint64) {
		if got, want := hashKey(a, b), xxhashRef(a, b); got != want {
			t.Fatalf("hashKey(%#x, %#x) = %#x, xxhash %#x", a, b, got, want)
		}
	})
}

var hashSink uint64

// BenchmarkHashKey compares hashKey with xxhash.Sum64 over a built buffer.
func BenchmarkHashKey(b *testing.B) {
	b.Run("hashKey", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			hashSink += hashKey(uint64(i), 7)
		}
	})
	b.Run("xxhash.Sum64", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			hashSink += xxhashRef(uint64(i), 7)
		}
	})
}
