package trace

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/vasmon"
)

// randRecord returns a random valid record, as a reader returns it (Data
// holds only Size bytes, Old only with HasOld).
func randRecord(rng *rand.Rand, t int64) Record {
	r := Record{Time: t, VM: vasmon.VMID(rng.Uint32N(5))}
	if rng.IntN(4) == 0 {
		r.VM = vasmon.VMID(rng.Uint32())
	}
	switch x := rng.IntN(100); {
	case x < 3:
		r.Kind = KindVMAdd
		r.RAM = rng.Uint64N(1 << 40)
		r.MaxTables = rng.Int64N(1 << 20)
	case x < 5:
		r.Kind = KindVMRemove
	case x < 12:
		r.Kind = KindPage
		r.GPA = rng.Uint64N(1<<30) &^ (PageSize - 1)
		r.Page = make([]byte, PageSize)
		for i := rng.IntN(600); i > 0; i-- {
			binary.LittleEndian.PutUint64(r.Page[8*rng.IntN(512):], rng.Uint64())
		}
	case x < 15:
		r.Kind = KindRootStart
		r.CR3 = rng.Uint64()
		r.Mode = vasmon.Modes[rng.IntN(4)]
		r.Monitored = rng.Uint64()
		r.Opts = engine.RootOptions{Options: vasmon.Options{FullSpace: rng.IntN(2) == 0, IgnoreNullPage: rng.IntN(2) == 0,
			HVMICompat: rng.IntN(2) == 0, MaxTables: rng.Int64N(1000)}, SerializeCallbacks: rng.IntN(2) == 0}
		r.Name = strings.Repeat("n", rng.IntN(MaxName+1))
	case x < 17:
		r.Kind = KindRootStop
		r.CR3 = rng.Uint64()
	default:
		r.Kind = KindEvent
		r.GPA = rng.Uint64() >> rng.IntN(64)
		r.Size = uint8(1 + rng.IntN(8))
		r.Data = rng.Uint64()
		if r.Size < 8 {
			r.Data &= 1<<(8*r.Size) - 1
		}
		if rng.IntN(2) == 0 {
			r.HasOld, r.Old = true, rng.Uint64()
		}
		if rng.IntN(2) == 0 {
			r.RIP = rng.Uint64() >> rng.IntN(64)
		}
	}
	return r
}

func randRecords(seed uint64, n int) []Record {
	rng := rand.New(rand.NewPCG(seed, 1))
	recs := make([]Record, n)
	var t int64
	for i := range recs {
		t += rng.Int64N(1e6) - 1e5 // sometimes backwards
		recs[i] = randRecord(rng, t)
	}
	return recs
}

// write encodes recs, flushing after the records whose index flush reports,
// and returns the trace and the end offset of every block.
func write(t testing.TB, recs []Record, flush func(i int) bool) ([]byte, []int64) {
	t.Helper()
	var buf bytes.Buffer
	w, err := NewWriter(&buf, Header{Start: time.Unix(1700000000, 5)})
	if err != nil {
		t.Fatal(err)
	}
	var ends []int64
	last := int64(HeaderSize)
	mark := func() {
		if w.Offset() > last {
			last = w.Offset()
			ends = append(ends, last)
		}
	}
	for i := range recs {
		if err := w.Write(&recs[i]); err != nil {
			t.Fatal(err)
		}
		if int64(buf.Len()) != w.Offset() {
			t.Fatalf("offset %d, wrote %d", w.Offset(), buf.Len())
		}
		mark()
		if flush != nil && flush(i) {
			if err := w.Flush(); err != nil {
				t.Fatal(err)
			}
			mark()
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	mark()
	return buf.Bytes(), ends
}

// readAll reads a trace to its end; it returns the records (copied) and the
// error that ended it (nil at a clean end).
func readAll(data []byte, salvage bool) ([]Record, *Reader, error) {
	r, err := NewReader(bytes.NewReader(data), ReaderOptions{Salvage: salvage})
	if err != nil {
		return nil, nil, err
	}
	var recs []Record
	for {
		rec, err := r.Next()
		if err == io.EOF {
			return recs, r, nil
		}
		if err != nil {
			return recs, r, err
		}
		c := *rec
		if c.Page != nil {
			c.Page = append([]byte(nil), c.Page...)
		}
		recs = append(recs, c)
	}
}

func sameRecords(t *testing.T, want, got []Record) {
	t.Helper()
	if len(want) != len(got) {
		t.Fatalf("read %d records, wrote %d", len(got), len(want))
	}
	for i := range want {
		if !reflect.DeepEqual(want[i], got[i]) {
			t.Fatalf("record %d:\n got %v\nwant %v", i, &got[i], &want[i])
		}
	}
}

func TestRoundTrip(t *testing.T) {
	recs := randRecords(1, 30000)
	data, ends := write(t, recs, nil)
	if len(ends) < 5 {
		t.Fatalf("only %d blocks", len(ends))
	}
	got, r, err := readAll(data, false)
	if err != nil {
		t.Fatal(err)
	}
	sameRecords(t, recs, got)
	if h := r.Header(); h.Major != Major || h.Minor != Minor || !h.Start.Equal(time.Unix(1700000000, 5)) {
		t.Fatalf("header %+v", h)
	}
	if r.Bytes() != int64(len(data)) {
		t.Fatalf("read %d bytes of %d", r.Bytes(), len(data))
	}
	t.Logf("%d records in %d bytes, %d blocks", len(recs), len(data), len(ends))
}

// TestBlockBoundaries ends blocks at every record, at random places, and
// never (one block), and checks the records come back in order.
func TestBlockBoundaries(t *testing.T) {
	recs := randRecords(2, 500)
	rng := rand.New(rand.NewPCG(2, 2))
	for name, f := range map[string]func(int) bool{
		"each":   func(int) bool { return true },
		"random": func(int) bool { return rng.IntN(7) == 0 },
		"none":   nil,
	} {
		t.Run(name, func(t *testing.T) {
			data, ends := write(t, recs, f)
			got, _, err := readAll(data, false)
			if err != nil {
				t.Fatal(err)
			}
			sameRecords(t, recs, got)
			t.Logf("%d blocks", len(ends))
		})
	}
	// An empty trace: a header and an end record.
	data, _ := write(t, nil, nil)
	if got, _, err := readAll(data, false); err != nil || len(got) != 0 {
		t.Fatalf("empty trace: %d records, %v", len(got), err)
	}
}

// TestWriterRefuses checks invalid records are refused without breaking the
// writer.
func TestWriterRefuses(t *testing.T) {
	var buf bytes.Buffer
	w, _ := NewWriter(&buf, Header{})
	for _, r := range []Record{
		{Kind: KindEvent, Size: 0}, {Kind: KindEvent, Size: 9},
		{Kind: KindPage, GPA: 8, Page: make([]byte, PageSize)}, {Kind: KindPage, Page: make([]byte, 10)},
		{Kind: KindRootStart, Mode: 9}, {Kind: KindRootStart, Mode: vasmon.Mode4, Name: strings.Repeat("x", MaxName+1)},
		{Kind: kindEnd}, {Kind: 0},
	} {
		if err := w.Write(&r); err == nil {
			t.Fatalf("accepted %v", &r)
		}
	}
	ok := Record{Kind: KindEvent, Size: 8, GPA: 64}
	if err := w.Write(&ok); err != nil {
		t.Fatal(err)
	}
	w.Close()
	if err := w.Write(&ok); err == nil {
		t.Fatal("write after close accepted")
	}
	if got, _, err := readAll(buf.Bytes(), false); err != nil || len(got) != 1 {
		t.Fatalf("%d records, %v", len(got), err)
	}
}

// eventSource writes n event records (as a producer would) to w.
func eventSource(w io.Writer, n int) error {
	tw, err := NewWriter(w, Header{})
	if err != nil {
		return err
	}
	rng := rand.New(rand.NewPCG(3, 3))
	rec := Record{Kind: KindEvent}
	for i := 0; i < n; i++ {
		rec.Time += int64(rng.IntN(2000))
		rec.VM = vasmon.VMID(i % 4)
		rec.GPA = 1<<20 + rng.Uint64N(1<<16)*8
		rec.Size = 8
		rec.Data = rng.Uint64() & 0x000FFFFFFFFFF0FF
		rec.HasOld = i%2 == 0
		rec.Old = 0
		if rec.HasOld {
			rec.Old = rng.Uint64() & 0x000FFFFFFFFFF0FF
		}
		rec.RIP = 0xFFFFFFFF81000000 + uint64(rng.IntN(1<<20))
		if err := tw.Write(&rec); err != nil {
			return err
		}
	}
	return tw.Close()
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(b []byte) (int, error) { c.n += int64(len(b)); return len(b), nil }

func heap() (inuse, total uint64) {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc, ms.TotalAlloc
}

// TestConstantMemory writes and reads a trace of a million events through a
// pipe: neither side's heap grows with the trace.
func TestConstantMemory(t *testing.T) {
	n := 1_000_000
	if testing.Short() {
		n = 200_000
	}
	base, total0 := heap()
	var cw countWriter
	if err := eventSource(&cw, n); err != nil {
		t.Fatal(err)
	}
	_, total1 := heap()
	if d := total1 - total0; d > 1<<20 {
		t.Fatalf("writing %d events (%d MB) allocated %d bytes", n, cw.n>>20, d)
	}

	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(eventSource(pw, n)) }()
	r, err := NewReader(pr, ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var peak uint64
	count := 0
	for {
		_, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if count++; count%(n/8) == 0 {
			if h, _ := heap(); h > peak {
				peak = h
			}
		}
	}
	if count != n {
		t.Fatalf("read %d events of %d", count, n)
	}
	growth := int64(peak) - int64(base)
	t.Logf("%d events, %.1f MB of trace; heap growth while reading %d KB", n, float64(cw.n)/1e6, growth>>10)
	if growth > 4<<20 || growth > cw.n/4 {
		t.Fatalf("heap grew by %d bytes reading a %d-byte trace", growth, cw.n)
	}
}

// smallTrace is a trace of a few blocks holding every kind of record.
func smallTrace(t testing.TB) ([]byte, []Record, []int64) {
	recs := []Record{
		{Kind: KindVMAdd, Time: 5, VM: 1, RAM: 64 << 20},
		{Kind: KindPage, Time: 6, VM: 1, GPA: 0x100000, Page: make([]byte, PageSize)},
		{Kind: KindRootStart, Time: 9, VM: 1, CR3: 0x100000, Mode: vasmon.Mode4, Monitored: 6, Name: "p1"},
		{Kind: KindEvent, Time: 12, VM: 1, GPA: 0x100008, Size: 8, Data: 0x200003, HasOld: true, Old: 1, RIP: 77},
		{Kind: KindEvent, Time: 11, VM: 1, GPA: 0x100010, Size: 4, Data: 0x3003},
		{Kind: KindRootStop, Time: 40, VM: 1, CR3: 0x100000},
		{Kind: KindVMRemove, Time: 41, VM: 1},
	}
	binary.LittleEndian.PutUint64(recs[1].Page[16:], 0xABCDEF000007)
	data, ends := write(t, recs, func(i int) bool { return i%2 == 1 })
	return data, recs, ends
}

// intact returns how many records the blocks wholly before offset hold.
func intact(recs []Record, ends []int64, off int64) int {
	n := 0
	for i, e := range ends[:len(ends)-1] { // the last block is the End's
		if e <= off {
			n = min(2*(i+1), len(recs))
		}
	}
	return n
}

func damageOf(t *testing.T, err error) *Error {
	t.Helper()
	var te *Error
	if !errors.As(err, &te) {
		t.Fatalf("error %v (%T) is not a *trace.Error", err, err)
	}
	return te
}

// TestTruncated cuts a small trace at every byte offset.
func TestTruncated(t *testing.T) {
	data, recs, ends := smallTrace(t)
	for cut := 0; cut < len(data); cut++ {
		got, _, err := readAll(data[:cut], false)
		if err == nil {
			t.Fatalf("cut at %d: no error", cut)
		}
		te := damageOf(t, err)
		if !errors.Is(err, ErrTruncated) || te.Offset < 0 || te.Offset > int64(cut) {
			t.Fatalf("cut at %d: %v", cut, err)
		}
		want := intact(recs, ends, int64(cut))
		if len(got) != want {
			t.Fatalf("cut at %d: %d records before the error, want %d", cut, len(got), want)
		}
		if cut < HeaderSize {
			continue
		}
		got, r, err := readAll(data[:cut], true)
		if err != nil {
			t.Fatalf("cut at %d, salvage: %v", cut, err)
		}
		sameRecords(t, recs[:want], got)
		if d := r.Damage(); d == nil || !errors.Is(d, ErrTruncated) || damageOf(t, d).Offset != te.Offset {
			t.Fatalf("cut at %d, salvage: damage %v", cut, d)
		}
	}
	if _, r, err := readAll(data, true); err != nil || r.Damage() != nil {
		t.Fatalf("whole trace: %v, %v", err, r.Damage())
	}
	t.Logf("last cut: %v", func() error { _, _, err := readAll(data[:len(data)-1], false); return err }())
}

// TestFlipped flips each byte of a small trace: every flip is detected, at
// the offset of the damaged header field or block.
func TestFlipped(t *testing.T) {
	data, recs, ends := smallTrace(t)
	blockOf := func(off int64) int64 {
		start := int64(HeaderSize)
		for _, e := range ends {
			if off < e {
				return start
			}
			start = e
		}
		return -1
	}
	for off := range data {
		bad := bytes.Clone(data)
		bad[off] ^= 0x10
		got, _, err := readAll(bad, false)
		if err == nil {
			t.Fatalf("flip at %d: no error", off)
		}
		te := damageOf(t, err)
		var want int64
		switch {
		case off < 8:
			want = 0
		case off < 10:
			want = 8
		case off < HeaderSize:
			want = 20
		default:
			want = blockOf(int64(off))
		}
		if te.Offset != want {
			t.Fatalf("flip at %d: error at offset %d, want %d: %v", off, te.Offset, want, err)
		}
		if off >= HeaderSize {
			if n := intact(recs, ends, want); len(got) != n {
				t.Fatalf("flip at %d: %d records, want %d", off, len(got), n)
			}
			if off >= 8+int(want) && !errors.Is(err, ErrChecksum) {
				t.Fatalf("flip at %d (a checksummed byte of block %d): %v", off, want, err)
			}
			got, r, err := readAll(bad, true)
			if err != nil || r.Damage() == nil || len(got) != intact(recs, ends, want) {
				t.Fatalf("flip at %d, salvage: %d records, %v, damage %v", off, len(got), err, r.Damage())
			}
		}
	}
	bad := bytes.Clone(data)
	bad[HeaderSize+20] ^= 1
	_, _, err := readAll(bad, false)
	t.Logf("example: %v", err)
}

func TestMagicAndVersion(t *testing.T) {
	data, _, _ := smallTrace(t)
	_, _, err := readAll(append([]byte("GIF89a.."), data[8:]...), false)
	if !errors.Is(err, ErrNotTrace) || damageOf(t, err).Offset != 0 {
		t.Fatalf("wrong magic: %v", err)
	}
	if _, _, err := readAll([]byte("hello"), false); !errors.Is(err, ErrNotTrace) {
		t.Fatalf("short foreign file: %v", err)
	}
	bad := bytes.Clone(data)
	binary.LittleEndian.PutUint16(bad[8:], 2)
	binary.LittleEndian.PutUint16(bad[10:], 3)
	_, _, err = readAll(bad, true)
	if !errors.Is(err, ErrVersion) || damageOf(t, err).Offset != 8 ||
		!strings.Contains(err.Error(), "version 2.3") || !strings.Contains(err.Error(), "supports 1.x") {
		t.Fatalf("wrong version: %v", err)
	}
	t.Logf("%v", err)
	// A later minor version is read (with its header checksum fixed).
	bad = bytes.Clone(data)
	binary.LittleEndian.PutUint16(bad[10:], 7)
	binary.LittleEndian.PutUint32(bad[20:], crc32.Checksum(bad[:20], castagnoli))
	if _, r, err := readAll(bad, false); err != nil || r.Header().Minor != 7 {
		t.Fatalf("minor version 7: %v", err)
	}
}

// block frames a payload (a test helper for hand-made traces).
func block(nrec int, payload []byte) []byte {
	b := make([]byte, FrameSize, FrameSize+len(payload))
	binary.LittleEndian.PutUint32(b[0:], uint32(len(payload)))
	binary.LittleEndian.PutUint32(b[4:], uint32(nrec))
	b = append(b, payload...)
	crc := crc32.Update(crc32.Checksum(b[:8], castagnoli), castagnoli, b[FrameSize:])
	binary.LittleEndian.PutUint32(b[8:], crc)
	return b
}

func header() []byte {
	var buf bytes.Buffer
	NewWriter(&buf, Header{Start: time.Unix(1, 0)})
	return buf.Bytes()
}

func rec(kind Kind, body ...byte) []byte {
	return append([]byte{byte(kind), byte(len(body))}, body...)
}

func endRec(n int) []byte { return rec(kindEnd, byte(n)) }

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// TestHandMade checks the versioning rules and the structural checks on
// traces built byte by byte.
func TestHandMade(t *testing.T) {
	ev := rec(KindEvent, 4, 1, 8, 0x10, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE, 0xFF, 0x11, 0x22) // t+=2, vm 1, size 8
	cases := []struct {
		name string
		data []byte
		err  error // nil: reads n records
		n    int
	}{
		{"ok", cat(header(), block(2, cat(ev, endRec(1)))), nil, 1},
		{"unknown kind skipped, its time kept", cat(header(), block(3, cat(rec(40, 20, 9, 9, 9), ev, endRec(2)))), nil, 1},
		{"extra field ignored", cat(header(), block(2, cat(rec(KindRootStop, 2, 1, 0x55, 0x99, 0x99), endRec(1)))), nil, 1},
		{"end count wrong", cat(header(), block(2, cat(ev, endRec(2)))), ErrMalformed, 1},
		{"end not last", cat(header(), block(2, cat(endRec(0), ev))), ErrMalformed, 0},
		{"data after end", cat(header(), block(1, endRec(0)), []byte{0}), ErrMalformed, 0},
		{"block after end", cat(header(), block(1, endRec(0)), block(1, endRec(0))), ErrMalformed, 0},
		{"no end", cat(header(), block(1, ev)), ErrTruncated, 1},
		{"bytes after last record", cat(header(), block(1, cat(ev, []byte{0}))), ErrMalformed, 0},
		{"record overruns block", cat(header(), block(1, rec(KindEvent, 4, 1)[:3])), ErrMalformed, 0},
		{"too few records", cat(header(), block(3, cat(ev, endRec(1)))), ErrMalformed, 1},
		{"size 0", cat(header(), block(2, cat(rec(KindEvent, 0, 1, 0, 8), endRec(1)))), ErrMalformed, 0},
		{"size 9", cat(header(), block(2, cat(rec(KindEvent, 0, 1, 9, 8, 1, 2, 3, 4, 5, 6, 7, 8, 9), endRec(1)))), ErrMalformed, 0},
		{"reserved event bit", cat(header(), block(2, cat(rec(KindEvent, 0, 1, 0x41, 8, 1), endRec(1)))), ErrMalformed, 0},
		{"short event", cat(header(), block(2, cat(rec(KindEvent, 0, 1, 8, 8, 1), endRec(1)))), ErrMalformed, 0},
		{"bad mode", cat(header(), block(2, cat(rec(KindRootStart, 0, 1, 0, 7, 0, 0, 0, 0), endRec(1)))), ErrMalformed, 0},
		{"reserved root flag", cat(header(), block(2, cat(rec(KindRootStart, 0, 1, 0, 3, 0, 0x10, 0, 0), endRec(1)))), ErrMalformed, 0},
		{"long name", cat(header(), block(2, cat(rec(KindRootStart, 0, 1, 0, 3, 0, 0, 0, 0x81, 0x02), endRec(1)))), ErrMalformed, 0},
		{"vm over 32 bits", cat(header(), block(2, cat(rec(KindVMRemove, 0, 0x80, 0x80, 0x80, 0x80, 0x10), endRec(1)))), ErrMalformed, 0},
		{"page words missing", cat(header(), block(2, cat(rec(KindPage, append([]byte{0, 1, 1, 1}, make([]byte, 63)...)...), endRec(1)))), ErrMalformed, 0},
		{"absurd block", cat(header(), []byte{0xFF, 0xFF, 0xFF, 0x7F, 1, 0, 0, 0, 0, 0, 0, 0}), ErrMalformed, 0},
		{"zero block", cat(header(), make([]byte, FrameSize)), ErrMalformed, 0},
	}
	for _, c := range cases {
		got, _, err := readAll(c.data, false)
		if c.err == nil && err != nil || c.err != nil && !errors.Is(err, c.err) || len(got) != c.n {
			t.Errorf("%s: %d records, %v; want %d, %v", c.name, len(got), err, c.n, c.err)
			continue
		}
		if err != nil {
			if te := damageOf(t, err); te.Offset < HeaderSize || te.Offset > int64(len(c.data)) {
				t.Errorf("%s: offset %d outside the blocks", c.name, te.Offset)
			}
		}
		if c.name == "unknown kind skipped, its time kept" && got[0].Time != 20/2+2 {
			t.Errorf("%s: time %d", c.name, got[0].Time)
		}
	}
}

func TestErrorString(t *testing.T) {
	err := errorf(1234, ErrChecksum, "block of %d bytes", 5)
	if s := err.Error(); s != "trace: offset 1234: checksum mismatch: block of 5 bytes" {
		t.Fatal(s)
	}
	if fmt.Sprint(Kind(99)) != "Kind(99)" || fmt.Sprint(KindPage) != "Page" {
		t.Fatal("kind names")
	}
}

// TestReaderCounts: Records counts every record (unknown kinds included),
// Unknown the records of unknown kinds, Ended the End record's check.
func TestReaderCounts(t *testing.T) {
	ev := rec(KindEvent, 4, 1, 8, 0x10, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE, 0xFF, 0x11, 0x22)
	r, err := NewReader(bytes.NewReader(cat(header(), block(3, cat(rec(40, 20, 9, 9, 9), ev, endRec(2))))), ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for {
		_, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if r.Ended() {
			t.Fatal("ended before the End record")
		}
		n++
	}
	if n != 1 || r.Records() != 2 || r.Unknown() != 1 || !r.Ended() {
		t.Fatalf("%d returned, Records %d, Unknown %d, Ended %v", n, r.Records(), r.Unknown(), r.Ended())
	}
}
