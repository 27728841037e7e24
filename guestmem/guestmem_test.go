package guestmem

import (
	"bytes"
	"math/rand/v2"
	"sync"
	"testing"
)

// TestRoundTrip compares random reads and writes of every size and
// alignment, across word and page boundaries, with a flat byte slice.
func TestRoundTrip(t *testing.T) {
	const size = 64 << 10
	m := New(size)
	ref := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 20000; i++ {
		n := 1 + rng.IntN(20)
		gpa := uint64(rng.IntN(size - n))
		if rng.IntN(2) == 0 {
			b := make([]byte, n)
			for j := range b {
				b[j] = byte(rng.Uint32())
			}
			if err := m.Write(gpa, b); err != nil {
				t.Fatal(err)
			}
			copy(ref[gpa:], b)
		} else if n <= 8 {
			v := rng.Uint64()
			old, err := m.WriteUint(gpa, n, v)
			if err != nil {
				t.Fatal(err)
			}
			var want uint64
			for j := n - 1; j >= 0; j-- {
				want = want<<8 | uint64(ref[gpa+uint64(j)])
			}
			if old != want {
				t.Fatalf("WriteUint(%#x, %d) old = %#x, want %#x", gpa, n, old, want)
			}
			for j := 0; j < n; j++ {
				ref[gpa+uint64(j)] = byte(v >> (8 * j))
			}
		}
		got := make([]byte, n)
		if err := m.Read(gpa, got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, ref[gpa:gpa+uint64(n)]) {
			t.Fatalf("read %#x+%d = %x, want %x", gpa, n, got, ref[gpa:gpa+uint64(n)])
		}
	}
	all := make([]byte, size)
	if err := m.Read(0, all); err != nil || !bytes.Equal(all, ref) {
		t.Fatalf("whole memory differs (%v)", err)
	}
}

func TestSparseAndBounds(t *testing.T) {
	m := New(1 << 40) // 1 TiB costs nothing until written
	if m.TouchedPages() != 0 {
		t.Fatal("new memory has pages")
	}
	if _, err := m.WriteUint(1<<39, 8, 42); err != nil {
		t.Fatal(err)
	}
	if v, _ := m.ReadUint(1<<39, 8); v != 42 || m.TouchedPages() != 1 {
		t.Fatalf("v=%d pages=%d", v, m.TouchedPages())
	}
	if v, err := m.ReadUint(12345, 8); err != nil || v != 0 || m.TouchedPages() != 1 {
		t.Fatalf("reading an untouched page: %d %v, pages %d", v, err, m.TouchedPages())
	}
	for _, gpa := range []uint64{1 << 40, 1<<40 - 4, ^uint64(0) - 2} {
		if err := m.Read(gpa, make([]byte, 8)); err == nil {
			t.Errorf("read at %#x succeeded", gpa)
		}
		if _, err := m.WriteUint(gpa, 8, 1); err == nil {
			t.Errorf("write at %#x succeeded", gpa)
		}
	}
	if !m.InRAM(1<<40-8, 8) || m.InRAM(1<<40-8, 9) {
		t.Error("InRAM bounds")
	}
	if err := m.Zero(1 << 39); err != nil {
		t.Fatal(err)
	}
	if v, _ := m.ReadUint(1<<39, 8); v != 0 {
		t.Fatal("Zero left data")
	}
}

// TestConcurrentBytes: writers of different bytes of the same words never
// lose each other's stores; readers run alongside (go test -race).
func TestConcurrentBytes(t *testing.T) {
	m := New(1 << 20)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 2000; i++ {
				gpa := uint64(i%64)*8 + uint64(w)
				if _, err := m.WriteUint(gpa, 1, uint64(w+1)); err != nil {
					t.Error(err)
					return
				}
				b := make([]byte, 16)
				_ = m.Read(gpa&^7, b)
			}
		}()
	}
	wg.Wait()
	for i := uint64(0); i < 64; i++ {
		v, _ := m.ReadUint(i*8, 8)
		if v != 0x0807060504030201 {
			t.Fatalf("word %d = %#x: a byte store was lost", i, v)
		}
	}
}
