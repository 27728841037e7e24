// Package guestmem is a sparse guest-physical memory for simulated and test
// guests.
//
// A Memory of any size costs host memory only for the 4 KiB pages that have
// been written (a page never written reads as zeros), plus one pointer per
// 4 MiB of address space for its page directory. It is safe for concurrent
// use and lock-free: pages are found through a two-level radix of atomic
// pointers, and page contents are 8-byte words accessed atomically, so
// concurrent writers of different bytes never lose each other's stores and
// readers never see a torn aligned word. Reads and writes allocate only when
// they create a page.
package guestmem

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
)

const (
	pageSize = 4096
	dirBits  = 10 // pages per directory chunk: 4 MiB of address space
)

type page [pageSize / 8]atomic.Uint64

type chunk [1 << dirBits]atomic.Pointer[page]

// Memory is a sparse guest-physical address space [0, Size).
type Memory struct {
	size uint64
	dir  []atomic.Pointer[chunk]
	n    atomic.Int64
}

// New returns an empty memory of size bytes (rounded up to a page).
func New(size uint64) *Memory {
	size = (size + pageSize - 1) &^ (pageSize - 1)
	chunks := (size/pageSize + 1<<dirBits - 1) >> dirBits
	return &Memory{size: size, dir: make([]atomic.Pointer[chunk], chunks)}
}

// Size returns the size of guest RAM in bytes.
func (m *Memory) Size() uint64 { return m.size }

// TouchedPages returns how many pages hold host memory.
func (m *Memory) TouchedPages() int { return int(m.n.Load()) }

// InRAM reports whether [gpa, gpa+n) lies inside guest RAM.
func (m *Memory) InRAM(gpa, n uint64) bool {
	return gpa < m.size && n <= m.size-gpa
}

// get returns the page pfn (in RAM), creating it if create is set.
func (m *Memory) get(pfn uint64, create bool) *page {
	d := &m.dir[pfn>>dirBits]
	c := d.Load()
	if c == nil {
		if !create {
			return nil
		}
		d.CompareAndSwap(nil, new(chunk))
		c = d.Load()
	}
	slot := &c[pfn&(1<<dirBits-1)]
	p := slot.Load()
	if p == nil && create {
		if slot.CompareAndSwap(nil, new(page)) {
			m.n.Add(1)
		}
		p = slot.Load()
	}
	return p
}

func (m *Memory) check(gpa uint64, n int) error {
	if !m.InRAM(gpa, uint64(n)) {
		return fmt.Errorf("guestmem: [%#x, %#x) is outside guest RAM of %#x bytes", gpa, gpa+uint64(n), m.size)
	}
	return nil
}

// Read copies guest memory at gpa into dst.
func (m *Memory) Read(gpa uint64, dst []byte) error {
	if err := m.check(gpa, len(dst)); err != nil {
		return err
	}
	var p *page
	pfn := ^uint64(0)
	for len(dst) > 0 {
		if gpa/pageSize != pfn {
			pfn = gpa / pageSize
			p = m.get(pfn, false)
		}
		w := gpa &^ 7
		var v uint64
		if p != nil {
			v = p[(w%pageSize)/8].Load()
		}
		off := gpa - w
		if off == 0 && len(dst) >= 8 {
			binary.LittleEndian.PutUint64(dst, v)
			dst = dst[8:]
			gpa += 8
			continue
		}
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], v)
		c := copy(dst, b[off:])
		dst = dst[c:]
		gpa += uint64(c)
	}
	return nil
}

// Write stores src at gpa. Each aligned 8-byte word is updated atomically.
func (m *Memory) Write(gpa uint64, src []byte) error {
	if err := m.check(gpa, len(src)); err != nil {
		return err
	}
	for len(src) > 0 {
		w := gpa &^ 7
		off := gpa - w
		n := min(uint64(len(src)), 8-off)
		var v uint64
		for i := uint64(0); i < n; i++ {
			v |= uint64(src[i]) << (8 * i)
		}
		m.store(gpa, int(n), v)
		src = src[n:]
		gpa += n
	}
	return nil
}

// store writes the low size bytes of v at gpa, within one aligned word, and
// returns their previous value.
func (m *Memory) store(gpa uint64, size int, v uint64) uint64 {
	word := &m.get(gpa/pageSize, true)[(gpa%pageSize)/8]
	sh := 8 * (gpa & 7)
	mask := ^uint64(0)
	if size < 8 {
		mask = uint64(1)<<(8*uint(size)) - 1
	}
	for {
		w := word.Load()
		nw := w&^(mask<<sh) | (v&mask)<<sh
		if word.CompareAndSwap(w, nw) {
			return (w >> sh) & mask
		}
	}
}

// ReadUint reads a little-endian value of size bytes (1..8) at gpa.
func (m *Memory) ReadUint(gpa uint64, size int) (uint64, error) {
	var b [8]byte
	if err := m.Read(gpa, b[:size]); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

// WriteUint stores the low size bytes (1..8) of v at gpa, little-endian, and
// returns the value of those bytes before the store. Stores within one
// aligned 8-byte word are atomic.
func (m *Memory) WriteUint(gpa uint64, size int, v uint64) (old uint64, err error) {
	if err := m.check(gpa, size); err != nil {
		return 0, err
	}
	if gpa&7+uint64(size) <= 8 {
		return m.store(gpa, size, v), nil
	}
	old, _ = m.ReadUint(gpa, size)
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	return old, m.Write(gpa, b[:size])
}

// Zero clears the page at the page-aligned gpa.
func (m *Memory) Zero(gpa uint64) error {
	if err := m.check(gpa&^(pageSize-1), pageSize); err != nil {
		return err
	}
	if p := m.get(gpa/pageSize, false); p != nil {
		for i := range p {
			p[i].Store(0)
		}
	}
	return nil
}
