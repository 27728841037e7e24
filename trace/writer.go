package trace

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/bits"
	"time"
)

// Writer encodes records into blocks and writes each block to the underlying
// writer with a single Write call when it is full, on Flush and on Close.
// Errors are sticky: after one, every call returns it.
type Writer struct {
	w       io.Writer
	blk     []byte // frame, then the payload being built
	n       uint32 // records in blk
	last    int64  // Time of the previous record
	records uint64
	off     int64 // bytes written
	err     error
	closed  bool
}

// NewWriter writes a header to w and returns a Writer of records. If
// h.Start is zero the current time is recorded.
func NewWriter(w io.Writer, h Header) (*Writer, error) {
	if h.Start.IsZero() {
		h.Start = time.Now()
	}
	var hdr [HeaderSize]byte
	copy(hdr[:], Magic)
	binary.LittleEndian.PutUint16(hdr[8:], Major)
	binary.LittleEndian.PutUint16(hdr[10:], Minor)
	binary.LittleEndian.PutUint64(hdr[12:], uint64(h.Start.UnixNano()))
	binary.LittleEndian.PutUint32(hdr[20:], crc32.Checksum(hdr[:20], castagnoli))
	tw := &Writer{w: w, blk: make([]byte, FrameSize, FrameSize+BlockSize+2*PageSize)}
	if _, err := w.Write(hdr[:]); err != nil {
		return nil, err
	}
	tw.off = HeaderSize
	return tw, nil
}

// Offset returns the number of bytes written to the underlying writer.
func (w *Writer) Offset() int64 { return w.off }

// Records returns the number of records written (buffered ones included).
func (w *Writer) Records() uint64 { return w.records }

// Write appends a record to the current block, and writes the block out if
// it is full. Invalid records (an event size outside 1..8, an unaligned page,
// a bad mode, a long name) are refused with an error that is not sticky.
func (w *Writer) Write(r *Record) error {
	if w.err != nil {
		return w.err
	}
	if w.closed {
		return errors.New("trace: write to a closed Writer")
	}
	if err := check(r); err != nil {
		return err
	}
	start := len(w.blk)
	b := append(w.blk, byte(r.Kind), 0) // one length byte, widened below if needed
	body := len(b)
	b = binary.AppendVarint(b, r.Time-w.last)
	b = binary.AppendUvarint(b, uint64(r.VM))
	switch r.Kind {
	case KindEvent:
		head := r.Size
		if r.HasOld {
			head |= evHasOld
		}
		if r.RIP != 0 {
			head |= evHasRIP
		}
		b = append(b, head)
		b = binary.AppendUvarint(b, r.GPA)
		for i := uint8(0); i < r.Size; i++ {
			b = append(b, byte(r.Data>>(8*i)))
		}
		if r.HasOld {
			b = binary.LittleEndian.AppendUint64(b, r.Old)
		}
		if r.RIP != 0 {
			b = binary.AppendUvarint(b, r.RIP)
		}
	case KindPage:
		b = binary.AppendUvarint(b, r.GPA/PageSize)
		b = appendPage(b, r.Page)
	case KindVMAdd:
		b = binary.AppendUvarint(b, r.RAM)
		b = binary.AppendUvarint(b, uint64(max(r.MaxTables, 0)))
	case KindVMRemove:
	case KindRootStart:
		b = binary.AppendUvarint(b, r.CR3)
		b = append(b, byte(r.Mode))
		b = binary.AppendUvarint(b, r.Monitored)
		b = append(b, rootFlags(r))
		b = binary.AppendUvarint(b, uint64(max(r.Opts.MaxTables, 0)))
		b = binary.AppendUvarint(b, uint64(len(r.Name)))
		b = append(b, r.Name...)
	case KindRootStop:
		b = binary.AppendUvarint(b, r.CR3)
	}
	w.blk = setLen(b, start+1, body)
	w.last = r.Time
	w.n++
	w.records++
	if len(w.blk)-FrameSize >= BlockSize {
		return w.Flush()
	}
	return nil
}

// setLen stores the body length (of b[body:]) as a uvarint at b[at], where
// one byte was reserved, moving the body if the length needs more.
func setLen(b []byte, at, body int) []byte {
	n := uint64(len(b) - body)
	if n < 0x80 {
		b[at] = byte(n)
		return b
	}
	var lb [binary.MaxVarintLen64]byte
	k := binary.PutUvarint(lb[:], n)
	b = append(b, lb[:k-1]...)
	copy(b[body+k-1:], b[body:len(b)-(k-1)])
	copy(b[at:], lb[:k])
	return b
}

func check(r *Record) error {
	switch r.Kind {
	case KindEvent:
		if r.Size < 1 || r.Size > 8 {
			return fmt.Errorf("trace: event size %d: must be 1..8", r.Size)
		}
	case KindPage:
		if r.GPA%PageSize != 0 || r.GPA/PageSize > maxPFN || len(r.Page) != PageSize {
			return fmt.Errorf("trace: page record at %#x with %d bytes: want an aligned page of %d", r.GPA, len(r.Page), PageSize)
		}
	case KindRootStart:
		if r.Mode < 1 || r.Mode > 4 {
			return fmt.Errorf("trace: root mode %d", r.Mode)
		}
		if len(r.Name) > MaxName {
			return fmt.Errorf("trace: root name of %d bytes: at most %d", len(r.Name), MaxName)
		}
	case KindVMAdd, KindVMRemove, KindRootStop:
	default:
		return fmt.Errorf("trace: cannot write a record of kind %v", r.Kind)
	}
	return nil
}

func rootFlags(r *Record) byte {
	var f byte
	if r.Opts.FullSpace {
		f |= flagFullSpace
	}
	if r.Opts.IgnoreNullPage {
		f |= flagIgnoreNullPage
	}
	if r.Opts.HVMICompat {
		f |= flagHVMICompat
	}
	if r.Opts.SerializeCallbacks {
		f |= flagSerialize
	}
	return f
}

// appendPage encodes a page as a bitmap of its non-zero 8-byte words
// followed by those words: page-table pages are mostly zeros.
func appendPage(b []byte, page []byte) []byte {
	at := len(b)
	b = append(b, make([]byte, PageSize/64)...)
	for i := 0; i < PageSize/8; i++ {
		v := binary.LittleEndian.Uint64(page[8*i:])
		if v != 0 {
			b[at+i/8] |= 1 << (i % 8)
			b = binary.LittleEndian.AppendUint64(b, v)
		}
	}
	return b
}

// pageWords returns how many words a page bitmap announces.
func pageWords(bitmap []byte) int {
	n := 0
	for i := 0; i+8 <= len(bitmap); i += 8 {
		n += bits.OnesCount64(binary.LittleEndian.Uint64(bitmap[i:]))
	}
	return n
}

// Flush writes the current block out, if it holds any record.
func (w *Writer) Flush() error {
	if w.err != nil || w.n == 0 {
		return w.err
	}
	b := w.blk
	binary.LittleEndian.PutUint32(b[0:], uint32(len(b)-FrameSize))
	binary.LittleEndian.PutUint32(b[4:], w.n)
	crc := crc32.Update(crc32.Checksum(b[:8], castagnoli), castagnoli, b[FrameSize:])
	binary.LittleEndian.PutUint32(b[8:], crc)
	if _, err := w.w.Write(b); err != nil {
		w.err = fmt.Errorf("trace: writing block at offset %d: %w", w.off, err)
		return w.err
	}
	w.off += int64(len(b))
	w.blk = b[:FrameSize]
	w.n = 0
	return nil
}

// Close writes the end record and the last block. It does not close the
// underlying writer. Close is idempotent.
func (w *Writer) Close() error {
	if w.closed || w.err != nil {
		return w.err
	}
	w.closed = true
	w.blk = append(w.blk, byte(kindEnd), 0)
	at := len(w.blk)
	w.blk = binary.AppendUvarint(w.blk, w.records)
	w.blk[at-1] = byte(len(w.blk) - at)
	w.n++
	return w.Flush()
}
