package qemu

import (
	"fmt"
	"math"
	"os"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vasengine/vasengine/guestmem"
	"github.com/vasengine/vasengine/vasmon"
)

// The control file shared with plugin/ptstore.c: a header page pair, the
// version word of every guest page (guestmem.Versions: one 8-byte word per
// 4 KiB page, bit 0 write-protected, bits 32-63 the change count), the
// bitmap of the pages of monitored roots (one bit per page), optionally the
// bitmap of linked pages (window records, Config.Windows) and the ring of
// store records. The constants and structs here must agree with the
// plugin's (both assert the offsets; the plugin checks the header's).
const (
	ctlMagic    = 0x3153545051534156 // "VASQPTS1"
	ctlVersion  = 3                  // 1: a bitmap of protected pages, no stamps; 2: no holds
	maxVCPUs    = 64
	ctlHdrBytes = 8192
)

type vcpuCounters struct {
	Stores, IO, Records, Waits, WaitNs, CrossPage uint64
	// Ack is the seq of the last held record of the vCPU the Go side
	// answered; Waiting says the vCPU sleeps on it (futex).
	Ack, Waiting uint32
	HeldNs       uint64 // time the vCPU was held
}

type ctlHeader struct {
	Magic      uint64
	Version    uint32
	MaxVCPUs   uint32
	RingSlots  uint64
	VerPages   uint64 // version words: one per page of guest RAM
	RAMBytes   uint64
	Attached   uint32
	SMPVCPUs   uint32
	VerOffset  uint64 // offset 48: byte offset of the version words in the file
	RingOffset uint64 // offset 56: byte offset of the ring
	Head       uint64 // offset 64: next slot producers reserve
	_          [7]uint64
	Tail       uint64 // offset 128: next slot the Go side consumes
	_          [7]uint64
	Drops      uint64 // offset 192
	PGDSig     uint64 // offset 200: entry 511 of the reference PGD; 0: unknown
	RootOffset uint64 // offset 208: byte offset of the bitmap of root pages
	// Sync (offset 216) makes the plugin hold a vCPU after each entry or
	// PGD record until the Go side answers it (Ack); GoPID is this
	// process, which the plugin checks while it holds a vCPU.
	Sync, GoPID uint32
	// Bell (offset 224) counts held records pushed: the drainer sleeps on
	// it (futex) while BellWaiting.
	Bell, BellWaiting uint32
	LinkOffset        uint64                 // offset 232: byte offset of the bitmap of linked pages; 0: no window records
	GiveUps           uint64                 // offset 240: holds the plugin gave up (no answer in 10 s, or this process gone)
	WindowRecs        uint64                 // offset 248: window records pushed
	VCPU              [maxVCPUs]vcpuCounters // offset 256
	// RefKernel (offset 4352) is the reference kernel half (entries
	// 256-511 of a live PGD), valid once PGDSig is set.
	RefKernel [512 - userEntries]uint64
}

// record is one store to a protected page, per 8-byte entry touched.
type record struct {
	Seq      uint64 // slot number + 1 once complete
	GPA      uint64 // 8-byte aligned entry address
	Val      uint64 // the entry after the store
	RIP      uint64
	TS       int64 // CLOCK_MONOTONIC ns
	VCPU     uint32
	Size     uint32 // bytes of the store
	StoreGPA uint64
	Kind     uint32 // recEntry or recPGD; for recEntry, an end of the root in bits 8-15 (recRootEnd)
	// Ver is the store's stamp on its page's version word: the plugin
	// counts every store to a protected page, per entry, as a trapped
	// write begun and ended after it reached memory (guestmem.Versions.Trap).
	Ver uint32
}

// Record kinds.
const (
	recEntry = 0 // a store to a protected page: GPA and Val are the entry
	recPGD   = 1 // a page completed with the PGD signature: GPA is the page
	// A store to an unprotected page that an entry record had linked
	// (marked in the control file's bitmap of linked pages) since: GPA
	// is the page, Ver its version word's change count at the store.
	recWindow = 2
	recKind   = 0xFF
	// Kind>>recRootEnd is not 0 on the record of a store that ended the
	// root whose top-level table its page was (its bit set in the control
	// file's bitmap of root pages): whyKernel or whyEmpty. The plugin has
	// then write-unprotected the page and cleared its root bit.
	recRootEnd = 8
)

// Compile-time layout checks (an index out of range fails the build).
var _ = [1]struct{}{}[unsafe.Offsetof(ctlHeader{}.Head)-64]
var _ = [1]struct{}{}[unsafe.Offsetof(ctlHeader{}.Tail)-128]
var _ = [1]struct{}{}[unsafe.Offsetof(ctlHeader{}.Drops)-192]
var _ = [1]struct{}{}[unsafe.Offsetof(ctlHeader{}.VCPU)-256]
var _ = [1]struct{}{}[unsafe.Offsetof(ctlHeader{}.PGDSig)-200]
var _ = [1]struct{}{}[unsafe.Offsetof(ctlHeader{}.RootOffset)-208]
var _ = [1]struct{}{}[unsafe.Offsetof(ctlHeader{}.Sync)-216]
var _ = [1]struct{}{}[unsafe.Offsetof(ctlHeader{}.Bell)-224]
var _ = [1]struct{}{}[unsafe.Offsetof(ctlHeader{}.LinkOffset)-232]
var _ = [1]struct{}{}[unsafe.Offsetof(ctlHeader{}.WindowRecs)-248]
var _ = [1]struct{}{}[unsafe.Offsetof(vcpuCounters{}.Ack)-48]
var _ = [1]struct{}{}[unsafe.Offsetof(ctlHeader{}.RefKernel)-4352]
var _ = [1]struct{}{}[unsafe.Offsetof(ctlHeader{}.VerOffset)-48]
var _ = [1]struct{}{}[unsafe.Offsetof(ctlHeader{}.RingOffset)-56]
var _ = [1]struct{}{}[unsafe.Offsetof(record{}.Kind)-56]
var _ = [1]struct{}{}[unsafe.Offsetof(record{}.Ver)-60]
var _ = [1]struct{}{}[unsafe.Sizeof(record{})-64]
var _ = [1]struct{}{}[unsafe.Sizeof(vcpuCounters{})-64]

// control is the Go side's mapping of a control file.
type control struct {
	path  string
	buf   []byte
	hdr   *ctlHeader
	vers  *guestmem.Versions // over the file's version words
	roots []atomic.Uint64    // the file's bitmap of root pages
	links []atomic.Uint64    // the file's bitmap of linked pages (nil: no window records)
	ring  []record
	mask  uint64
	tail  uint64 // consumer position (only the drainer touches it)
}

// verBytes is the size of the version words of pages, rounded up to a page;
// rootBytes the size of their bitmap.
func verBytes(pages uint64) uint64  { return (pages*8 + 4095) &^ 4095 }
func rootBytes(pages uint64) uint64 { return ((pages+63)/64*8 + 4095) &^ 4095 }

// newControl creates the control file at path for a guest of ramBytes, with
// a bitmap of linked pages if windows.
func newControl(path string, ramBytes uint64, slots int, windows bool) (*control, error) {
	if slots <= 0 || slots&(slots-1) != 0 {
		return nil, fmt.Errorf("qemu: ring slots %d: must be a power of two", slots)
	}
	pages := ramBytes / vasmon.PageSize
	verOff := uint64(ctlHdrBytes)
	rootOff := verOff + verBytes(pages)
	linkOff := uint64(0)
	ringOff := rootOff + rootBytes(pages)
	if windows {
		linkOff, ringOff = ringOff, ringOff+rootBytes(pages)
	}
	size := ringOff + uint64(slots)*uint64(unsafe.Sizeof(record{}))
	buf, err := mapFile(path, size, true)
	if err != nil {
		return nil, err
	}
	c := &control{path: path, buf: buf, hdr: (*ctlHeader)(unsafe.Pointer(&buf[0])), mask: uint64(slots - 1)}
	// The file is new (all zero): no page protected, no change counted.
	c.vers = guestmem.VersionsOver(unsafe.Slice((*uint64)(unsafe.Pointer(&buf[verOff])), pages))
	c.roots = unsafe.Slice((*atomic.Uint64)(unsafe.Pointer(&buf[rootOff])), (pages+63)/64)
	if windows {
		c.links = unsafe.Slice((*atomic.Uint64)(unsafe.Pointer(&buf[linkOff])), (pages+63)/64)
	}
	c.ring = unsafe.Slice((*record)(unsafe.Pointer(&buf[ringOff])), slots)
	h := c.hdr
	h.Version, h.MaxVCPUs, h.RingSlots, h.VerPages, h.RAMBytes = ctlVersion, maxVCPUs, uint64(slots), pages, ramBytes
	h.VerOffset, h.RootOffset, h.RingOffset, h.LinkOffset = verOff, rootOff, ringOff, linkOff
	h.GoPID = uint32(os.Getpid())
	atomic.StoreUint64(&h.Magic, ctlMagic)
	return c, nil
}

// mapFile creates (truncating) a file of size bytes and maps it shared,
// read-write if rw, else read-only.
func mapFile(path string, size uint64, rw bool) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := f.Truncate(int64(size)); err != nil {
		return nil, err
	}
	prot := unix.PROT_READ
	if rw {
		prot |= unix.PROT_WRITE
	}
	b, err := unix.Mmap(int(f.Fd()), 0, int(size), prot, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("qemu: mmap %s: %w", path, err)
	}
	return b, nil
}

func (c *control) close() {
	if c.buf != nil {
		_ = unix.Munmap(c.buf)
		c.buf = nil
	}
	_ = os.Remove(c.path)
}

func (c *control) attached() bool { return atomic.LoadUint32(&c.hdr.Attached) != 0 }
func (c *control) head() uint64   { return atomic.LoadUint64(&c.hdr.Head) }
func (c *control) drops() uint64  { return atomic.LoadUint64(&c.hdr.Drops) }

// setRoot marks the page at gpa as the top-level table of a monitored root,
// or no longer. The plugin clears the mark itself when a store ends the
// root (recRootEnd).
func (c *control) setRoot(gpa uint64, on bool) {
	pfn := gpa / vasmon.PageSize
	w, bit := &c.roots[pfn/64], uint64(1)<<(pfn%64)
	if on {
		w.Or(bit)
	} else {
		w.And(^bit)
	}
}

// setSync turns the plugin's holds on or off. Off, it wakes every vCPU
// sleeping in a hold, which then goes on (counted as given up).
func (c *control) setSync(on bool) {
	v := uint32(0)
	if on {
		v = 1
	}
	atomic.StoreUint32(&c.hdr.Sync, v)
	if !on {
		for i := range c.hdr.VCPU {
			futexWake(&c.hdr.VCPU[i].Ack)
		}
	}
}

// ack answers the held record of seq of vCPU v: the vCPU goes on.
func (c *control) ack(v uint32, seq uint64) {
	vc := &c.hdr.VCPU[min(v, maxVCPUs-1)]
	atomic.StoreUint32(&vc.Ack, uint32(seq))
	if atomic.LoadUint32(&vc.Waiting) != 0 {
		futexWake(&vc.Ack)
	}
}

// ready reports whether the next record is complete.
func (c *control) ready() bool {
	return atomic.LoadUint64(&c.ring[c.tail&c.mask].Seq) == c.tail+1
}

// waitBell sleeps until the plugin rings the bell (a held record was
// pushed), or d has passed, unless a record is ready.
func (c *control) waitBell(d time.Duration) {
	b := atomic.LoadUint32(&c.hdr.Bell)
	atomic.StoreUint32(&c.hdr.BellWaiting, 1)
	if !c.ready() {
		futexWait(&c.hdr.Bell, b, d)
	}
	atomic.StoreUint32(&c.hdr.BellWaiting, 0)
}

// Futex operations (linux/futex.h), on words shared between processes.
const (
	futexWaitOp = 0
	futexWakeOp = 1
)

// futexWait sleeps while *addr == val, at most d (a shared futex: the word
// is in a file mapped by two processes).
func futexWait(addr *uint32, val uint32, d time.Duration) {
	ts := unix.NsecToTimespec(int64(d))
	_, _, _ = unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(addr)), futexWaitOp, uintptr(val), uintptr(unsafe.Pointer(&ts)), 0, 0)
}

// futexWake wakes the threads sleeping on addr.
func futexWake(addr *uint32) {
	_, _, _ = unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(addr)), futexWakeOp, math.MaxInt32, 0, 0, 0)
}

// setReference publishes the reference kernel half, by which the plugin
// finds new top-level tables (and tells a root page's reuse from a
// rewrite of its kernel half with the same values).
func (c *control) setReference(k *[512 - userEntries]uint64) {
	for i, v := range k {
		atomic.StoreUint64(&c.hdr.RefKernel[i], v)
	}
	atomic.StoreUint64(&c.hdr.PGDSig, k[len(k)-1])
}

// consume calls f for each complete record in order, at most max of them,
// releases their slots and returns how many it consumed. It stops at the
// first slot reserved but not yet complete.
func (c *control) consume(max int, f func(*record)) int {
	n := 0
	for ; n < max; n++ {
		r := &c.ring[c.tail&c.mask]
		if atomic.LoadUint64(&r.Seq) != c.tail+1 {
			break
		}
		f(r)
		c.tail++
	}
	if n > 0 {
		atomic.StoreUint64(&c.hdr.Tail, c.tail)
	}
	return n
}

// protect sets or clears the protected bit of the page at gpa, which counts
// as a change of the page (guestmem.Versions.SetProtected). Its atomic
// compare-and-swap is a full barrier: a read of the page after it sees
// every store the plugin did not report (the plugin fences between a store
// and its load of the word).
func (c *control) protect(p *pages, gpa uint64, on bool) error {
	if gpa%vasmon.PageSize != 0 || gpa/vasmon.PageSize >= uint64(c.vers.Pages()) {
		return fmt.Errorf("qemu: cannot protect %#x: not a page of guest RAM", gpa)
	}
	p.protect(gpa, on)
	return nil
}

// Counters are the plugin's counters, summed over vCPUs.
type Counters struct {
	Stores    uint64 // guest stores seen by the plugin (RAM and io)
	IO        uint64 // of which to io, skipped
	Records   uint64 // records pushed: stores to protected pages, per entry
	Waits     uint64 // pushes that found the ring full and waited
	WaitNs    uint64 // total time vCPUs waited for room in the ring
	CrossPage uint64 // stores that crossed a page boundary
	Drops     uint64 // records lost after a vCPU waited 10 s for room: must be 0
	// HeldNs is the time vCPUs were held after their records (Config.Sync);
	// GiveUps the holds given up (no answer in 10 s, or this process gone:
	// must be 0). WindowRecs are the window records pushed (Config.Windows).
	HeldNs, GiveUps, WindowRecs uint64
}

func (c *control) counters() Counters {
	var s Counters
	for i := range c.hdr.VCPU {
		v := &c.hdr.VCPU[i]
		s.Stores += atomic.LoadUint64(&v.Stores)
		s.IO += atomic.LoadUint64(&v.IO)
		s.Records += atomic.LoadUint64(&v.Records)
		s.Waits += atomic.LoadUint64(&v.Waits)
		s.WaitNs += atomic.LoadUint64(&v.WaitNs)
		s.CrossPage += atomic.LoadUint64(&v.CrossPage)
		s.HeldNs += atomic.LoadUint64(&v.HeldNs)
	}
	s.Drops = c.drops()
	s.GiveUps = atomic.LoadUint64(&c.hdr.GiveUps)
	s.WindowRecs = atomic.LoadUint64(&c.hdr.WindowRecs)
	return s
}

// ram is guest RAM as the monitor reads it: the memory-backend-file mapped
// read-only (read-write with Config.Sync, for reverting denied stores). With the pc machine and at most 2 GiB of RAM, guest RAM is
// contiguous from GPA 0 and file offset == GPA (larger guests get RAM above
// 4 GiB at a different file offset; Config refuses them). The legacy hole
// 0xA0000-0xFFFFF reads the backing file, not what the guest sees there; no
// page table lives in it.
type ram struct {
	path string
	buf  []byte
}

// newRAM maps the guest's RAM file, read-write if rw (the backend puts
// the old value of an entry back after a denied store).
func newRAM(path string, size uint64, rw bool) (*ram, error) {
	// QEMU maps the file shared; we create it at its full size first so it
	// can be mapped before QEMU starts.
	b, err := mapFile(path, size, rw)
	if err != nil {
		return nil, err
	}
	return &ram{path: path, buf: b}, nil
}

// Read implements vasmon.Memory.
func (m *ram) Read(gpa uint64, dst []byte) error {
	if !m.InRAM(gpa, uint64(len(dst))) {
		return fmt.Errorf("qemu: read [%#x, +%d) outside guest RAM", gpa, len(dst))
	}
	copy(dst, m.buf[gpa:])
	return nil
}

// InRAM implements vasmon.Memory.
func (m *ram) InRAM(gpa, n uint64) bool {
	size := uint64(len(m.buf))
	return gpa < size && n <= size-gpa
}

// word returns the aligned 8-byte word at gpa (which must be in RAM).
func (m *ram) word(gpa uint64) uint64 {
	return atomic.LoadUint64((*uint64)(unsafe.Pointer(&m.buf[gpa&^7])))
}

func (m *ram) close() {
	if m.buf != nil {
		_ = unix.Munmap(m.buf)
		m.buf = nil
	}
	_ = os.Remove(m.path)
}

// versionedRAM is guest RAM with the plugin's version words: the Memory the
// engine gets (vasmon.Versioned), so that it can prove each of its reads of
// guest RAM against the guest's concurrent stores.
type versionedRAM struct {
	*ram
	vers *guestmem.Versions
}

// Versions implements vasmon.Versioned.
func (m versionedRAM) Versions() *guestmem.Versions { return m.vers }
