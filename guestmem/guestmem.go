// Package guestmem is a sparse guest-physical memory for simulated and test
// guests.
//
// A Memory of any size costs host memory only for the 4 KiB pages that have
// been written (a page never written reads as zeros). It is safe for
// concurrent use: page contents are 8-byte words accessed atomically, so
// concurrent writers of different bytes never lose each other's stores and
// readers never see a torn aligned word; creating a page takes a short lock.
// Reads and writes allocate only when they create a page.
package guestmem

import (
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
)

const pageSize = 4096

type page [pageSize / 8]atomic.Uint64

// Memory is a sparse guest-physical address space [0, Size).
type Memory struct {
	size  uint64
	mu    sync.RWMutex
	pages map[uint64]*page
	n     atomic.Int64
}

// New returns an empty memory of size bytes (rounded up to a page).
func New(size uint64) *Memory {
	size = (size + pageSize - 1) &^ (pageSize - 1)
	return &Memory{size: size, pages: make(map[uint64]*page)}
}

// Size returns the size of guest RAM in bytes.
func (m *Memory) Size() uint64 { return m.size }

// TouchedPages returns how many pages hold host memory.
func (m *Memory) TouchedPages() int { return int(m.n.Load()) }

// InRAM reports whether [gpa, gpa+n) lies inside guest RAM.
func (m *Memory) InRAM(gpa, n uint64) bool {
	return gpa < m.size && n <= m.size-gpa
}

func (m *Memory) get(pfn uint64, create bool) *page {
	m.mu.RLock()
	p := m.pages[pfn]
	m.mu.RUnlock()
	if p != nil || !create {
		return p
	}
	m.mu.Lock()
	if p = m.pages[pfn]; p == nil {
		p = new(page)
		m.pages[pfn] = p
		m.n.Add(1)
	}
	m.mu.Unlock()
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
	for len(dst) > 0 {
		w := gpa &^ 7
		p := m.get(gpa/pageSize, false)
		var v uint64
		if p != nil {
			v = p[(w%pageSize)/8].Load()
		}
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], v)
		c := copy(dst, b[gpa-w:])
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
		p := m.get(gpa/pageSize, true)
		word := &p[(w%pageSize)/8]
		var mask, val uint64
		for i := uint64(0); i < n; i++ {
			mask |= 0xFF << (8 * (off + i))
			val |= uint64(src[i]) << (8 * (off + i))
		}
		for {
			old := word.Load()
			if word.CompareAndSwap(old, old&^mask|val) {
				break
			}
		}
		src = src[n:]
		gpa += n
	}
	return nil
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
		p := m.get(gpa/pageSize, true)
		word := &p[(gpa%pageSize)/8]
		sh := 8 * (gpa & 7)
		mask := uint64(1)<<(8*uint(size)) - 1
		if size == 8 {
			mask = ^uint64(0)
		}
		for {
			w := word.Load()
			nw := w&^(mask<<sh) | (v&mask)<<sh
			if word.CompareAndSwap(w, nw) {
				return (w >> sh) & mask, nil
			}
		}
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
