package trace

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"time"

	"github.com/vasengine/vasengine/vasmon"
)

// ReaderOptions configure a Reader.
type ReaderOptions struct {
	// Salvage makes damage end the trace cleanly: Next returns io.EOF after
	// the records of the last intact block and Damage returns the error.
	// (A damaged header is still an error of NewReader: nothing precedes
	// it.) I/O errors other than an early end are returned either way.
	Salvage bool
}

// Reader decodes a trace block by block.
type Reader struct {
	r       io.Reader
	opts    ReaderOptions
	hdr     Header
	off     int64  // bytes consumed from r
	blk     []byte // payload of the current block
	blkOff  int64  // offset of the current payload's first byte
	pos     int    // next record in blk
	left    uint32 // records of the block not yet decoded
	records uint64
	unknown uint64
	recOff  int64
	last    int64
	ended   bool
	err     error // sticky: damage or I/O error
	damage  error
	rec     Record
	frame   [FrameSize]byte
	page    [PageSize]byte
}

// NewReader reads and checks the header of a trace.
func NewReader(r io.Reader, opts ReaderOptions) (*Reader, error) {
	tr := &Reader{r: r, opts: opts}
	var h [HeaderSize]byte
	n, err := io.ReadFull(r, h[:])
	tr.off = int64(n)
	if m := min(n, len(Magic)); string(h[:m]) != Magic[:m] {
		return nil, errorf(0, ErrNotTrace, "the file starts with %q, not %q", h[:m], Magic)
	}
	if n >= 12 {
		major, minor := binary.LittleEndian.Uint16(h[8:]), binary.LittleEndian.Uint16(h[10:])
		if major != Major {
			return nil, errorf(8, ErrVersion, "the file is version %d.%d; this reader supports %d.x (up to %d.%d)",
				major, minor, Major, Major, Minor)
		}
		tr.hdr.Major, tr.hdr.Minor = major, minor
	}
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, errorf(int64(n), ErrTruncated, "the file ends within the %d-byte header", HeaderSize)
		}
		return nil, &Error{Offset: int64(n), Err: err}
	}
	if got, want := crc32.Checksum(h[:20], castagnoli), binary.LittleEndian.Uint32(h[20:]); got != want {
		return nil, errorf(20, ErrChecksum, "header CRC-32C is %#08x, the header says %#08x", got, want)
	}
	tr.hdr.Start = time.Unix(0, int64(binary.LittleEndian.Uint64(h[12:])))
	return tr, nil
}

// Header returns the trace's header.
func (r *Reader) Header() Header { return r.hdr }

// Offset returns the byte offset of the record last returned by Next.
func (r *Reader) Offset() int64 { return r.recOff }

// Records returns the number of records read so far, those of kinds this
// reader does not know (skipped by Next) included; once Next has returned
// io.EOF at the end of a complete trace, it is the count the trace's End
// record gives.
func (r *Reader) Records() uint64 { return r.records }

// Unknown returns the number of records Next skipped because their kind is
// unknown to this reader (a later minor version's).
func (r *Reader) Unknown() uint64 { return r.unknown }

// Ended reports whether the End record was read and checked: the trace is
// complete.
func (r *Reader) Ended() bool { return r.ended }

// Bytes returns the number of bytes read so far.
func (r *Reader) Bytes() int64 { return r.off }

// Damage returns, once Next has returned io.EOF in salvage mode, the damage
// that ended the trace early (an *Error), or nil if the trace was complete.
func (r *Reader) Damage() error { return r.damage }

// Next returns the next record, io.EOF at the end of the trace, or an error
// (an *Error for damage). The record is valid until the next call.
func (r *Reader) Next() (*Record, error) {
	for {
		if r.err != nil {
			return nil, r.err
		}
		if r.left == 0 {
			if r.ended {
				return nil, io.EOF
			}
			if err := r.nextBlock(); err != nil {
				return nil, r.fail(err)
			}
			continue
		}
		ok, err := r.decode()
		if err != nil {
			return nil, r.fail(err)
		}
		if ok {
			return &r.rec, nil
		}
	}
}

func (r *Reader) fail(err error) error {
	var te *Error
	if r.opts.Salvage && errors.As(err, &te) && te.Err != nil && isDamage(te.Err) {
		r.damage = err
		r.err = io.EOF
	} else {
		r.err = err
	}
	return r.err
}

func isDamage(err error) bool {
	return err == ErrTruncated || err == ErrChecksum || err == ErrMalformed
}

// nextBlock reads and checks the next block.
func (r *Reader) nextBlock() error {
	start := r.off
	f := r.frame[:]
	n, err := io.ReadFull(r.r, f)
	r.off += int64(n)
	if err != nil {
		if n == 0 && errors.Is(err, io.EOF) {
			return errorf(start, ErrTruncated, "the file ends at offset %d without an end record", start)
		}
		return r.readErr(err, start, "within the frame of the block at offset %d", start)
	}
	size, nrec := binary.LittleEndian.Uint32(f[0:]), binary.LittleEndian.Uint32(f[4:])
	if size == 0 || size > MaxBlock || nrec == 0 || nrec > size/2 {
		return errorf(start, ErrMalformed, "block frame announces %d bytes and %d records (at most %d bytes, 2 bytes a record)",
			size, nrec, MaxBlock)
	}
	// Read the payload in steps, so that a lying length costs no more
	// memory than the bytes actually present.
	r.blk = r.blk[:0]
	for uint32(len(r.blk)) < size {
		k := min(size-uint32(len(r.blk)), 64<<10)
		at := len(r.blk)
		r.blk = append(r.blk, make([]byte, k)...)[:at+int(k)]
		n, err := io.ReadFull(r.r, r.blk[at:])
		r.off += int64(n)
		if err != nil {
			return r.readErr(err, start, "within the block at offset %d (%d of its %d bytes present)",
				start, at+n, size)
		}
	}
	crc := crc32.Update(crc32.Checksum(f[:8], castagnoli), castagnoli, r.blk)
	if want := binary.LittleEndian.Uint32(f[8:]); crc != want {
		return errorf(start, ErrChecksum, "block of %d bytes has CRC-32C %#08x, its frame says %#08x", size, crc, want)
	}
	r.blkOff = start + FrameSize
	r.pos = 0
	r.left = nrec
	return nil
}

func (r *Reader) readErr(err error, off int64, format string, args ...any) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return errorf(off, ErrTruncated, "the file ends at offset %d, "+format, append([]any{r.off}, args...)...)
	}
	return &Error{Offset: r.off, Err: err}
}

// decode decodes the next record of the block. It returns false for a record
// to skip (an unknown kind) or the end record.
func (r *Reader) decode() (bool, error) {
	b := r.blk[r.pos:]
	off := r.blkOff + int64(r.pos)
	if len(b) < 2 {
		return false, errorf(off, ErrMalformed, "block ends before its %d remaining records", r.left)
	}
	kind := Kind(b[0])
	size, k := binary.Uvarint(b[1:])
	if k <= 0 || size > uint64(len(b)-1-k) {
		return false, errorf(off, ErrMalformed, "%v record length overruns its block", kind)
	}
	body := b[1+k : 1+k+int(size)]
	r.pos += 1 + k + int(size)
	r.left--
	if r.left == 0 && r.pos != len(r.blk) {
		return false, errorf(r.blkOff+int64(r.pos), ErrMalformed, "%d bytes after the block's last record", len(r.blk)-r.pos)
	}
	if kind == kindEnd {
		return false, r.end(body, off)
	}
	if kind < KindVMAdd || kind > KindEvent {
		// A record of a later minor version: skipped, but its time counts.
		d := dec{b: body}
		t := d.varint()
		if d.bad {
			return false, errorf(off, ErrMalformed, "%v record without a time", kind)
		}
		r.last += t
		r.records++
		r.unknown++
		return false, nil
	}
	d := dec{b: body}
	rec := &r.rec
	*rec = Record{Kind: kind, Time: r.last + d.varint(), VM: vasmon.VMID(d.u32())}
	switch kind {
	case KindEvent:
		head := d.byte()
		rec.Size = head & 0xF
		if rec.Size < 1 || rec.Size > 8 || head&^evKnown != 0 {
			return false, errorf(off, ErrMalformed, "event head byte %#x", head)
		}
		rec.GPA = d.uvarint()
		for i, c := range d.bytes(int(rec.Size)) {
			rec.Data |= uint64(c) << (8 * i)
		}
		if head&evHasOld != 0 {
			rec.HasOld = true
			rec.Old = binary.LittleEndian.Uint64(d.bytes(8))
		}
		if head&evHasRIP != 0 {
			rec.RIP = d.uvarint()
		}
	case KindPage:
		pfn := d.uvarint()
		if pfn > maxPFN {
			return false, errorf(off, ErrMalformed, "page frame %#x", pfn)
		}
		rec.GPA = pfn * PageSize
		bitmap := d.bytes(PageSize / 64)
		words := d.bytes(8 * pageWords(bitmap))
		if !d.bad {
			clear(r.page[:])
			for i := 0; i < PageSize/8; i++ {
				if bitmap[i/8]&(1<<(i%8)) != 0 {
					copy(r.page[8*i:], words[:8])
					words = words[8:]
				}
			}
		}
		rec.Page = r.page[:]
	case KindVMAdd:
		rec.RAM = d.uvarint()
		rec.MaxTables = d.int63()
	case KindVMRemove:
	case KindRootStart:
		rec.CR3 = d.uvarint()
		rec.Mode = vasmon.Mode(d.byte())
		rec.Monitored = d.uvarint()
		f := d.byte()
		rec.Opts.MaxTables = d.int63()
		n := d.uvarint()
		if d.bad || rec.Mode < 1 || rec.Mode > 4 || f&^flagsKnown != 0 || n > MaxName {
			return false, errorf(off, ErrMalformed, "root start: mode %d, flags %#x, name of %d bytes", rec.Mode, f, n)
		}
		rec.Opts.FullSpace = f&flagFullSpace != 0
		rec.Opts.IgnoreNullPage = f&flagIgnoreNullPage != 0
		rec.Opts.HVMICompat = f&flagHVMICompat != 0
		rec.Opts.SerializeCallbacks = f&flagSerialize != 0
		if name := d.bytes(int(n)); len(name) > 0 {
			rec.Name = string(name)
		}
	case KindRootStop:
		rec.CR3 = d.uvarint()
	}
	if d.bad {
		return false, errorf(off, ErrMalformed, "%v record of %d bytes is too short or has a field out of range", kind, size)
	}
	r.last = rec.Time
	r.records++
	r.recOff = off
	return true, nil
}

func (r *Reader) end(body []byte, off int64) error {
	d := dec{b: body}
	n := d.uvarint()
	if d.bad || r.left != 0 {
		return errorf(off, ErrMalformed, "end record is not the last record of its block")
	}
	if n != r.records {
		return errorf(off, ErrMalformed, "the end record counts %d records, the trace holds %d (blocks lost?)", n, r.records)
	}
	var b [1]byte
	if k, err := io.ReadFull(r.r, b[:]); k > 0 {
		return errorf(r.off, ErrMalformed, "data after the end record")
	} else if !errors.Is(err, io.EOF) {
		return &Error{Offset: r.off, Err: err}
	}
	r.ended = true
	return nil
}

// dec reads the fields of one record body; reading past its end sets bad
// and yields zeros.
type dec struct {
	b   []byte
	bad bool
}

func (d *dec) uvarint() uint64 {
	v, k := binary.Uvarint(d.b)
	if k <= 0 {
		d.bad = true
		d.b = nil
		return 0
	}
	d.b = d.b[k:]
	return v
}

func (d *dec) varint() int64 {
	v, k := binary.Varint(d.b)
	if k <= 0 {
		d.bad = true
		d.b = nil
		return 0
	}
	d.b = d.b[k:]
	return v
}

func (d *dec) u32() uint32 {
	v := d.uvarint()
	if v > 1<<32-1 {
		d.bad = true
	}
	return uint32(v)
}

func (d *dec) int63() int64 {
	v := d.uvarint()
	if v > 1<<63-1 {
		d.bad = true
	}
	return int64(v)
}

func (d *dec) byte() byte {
	if len(d.b) == 0 {
		d.bad = true
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

var zeros [PageSize]byte

func (d *dec) bytes(n int) []byte {
	if n > len(d.b) {
		d.bad = true
		d.b = nil
		return zeros[:min(n, len(zeros))]
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

// String describes a record on one line (for tools and test failures).
func (r *Record) String() string {
	switch r.Kind {
	case KindVMAdd:
		return fmt.Sprintf("t=%d VMAdd vm=%d ram=%#x maxTables=%d", r.Time, r.VM, r.RAM, r.MaxTables)
	case KindVMRemove:
		return fmt.Sprintf("t=%d VMRemove vm=%d", r.Time, r.VM)
	case KindPage:
		return fmt.Sprintf("t=%d Page vm=%d gpa=%#x", r.Time, r.VM, r.GPA)
	case KindRootStart:
		return fmt.Sprintf("t=%d RootStart vm=%d cr3=%#x mode=%v monitored=%#x opts=%+v name=%q",
			r.Time, r.VM, r.CR3, r.Mode, r.Monitored, r.Opts, r.Name)
	case KindRootStop:
		return fmt.Sprintf("t=%d RootStop vm=%d cr3=%#x", r.Time, r.VM, r.CR3)
	case KindEvent:
		return fmt.Sprintf("t=%d Event vm=%d gpa=%#x size=%d data=%#x old=%#x hasOld=%v rip=%#x",
			r.Time, r.VM, r.GPA, r.Size, r.Data, r.Old, r.HasOld, r.RIP)
	}
	return fmt.Sprintf("t=%d %v", r.Time, r.Kind)
}
