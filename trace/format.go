// Package trace records the stream a backend drives into the engine (VMs,
// roots, trapped writes and the guest pages the engine reads) in a compact
// file, and reads it back, so that a run can be replayed without the original
// guest (package backends/replay). FORMAT.md beside this file specifies the
// format: a versioned header, then blocks of varint-encoded records, each
// block checksummed with CRC-32C, and an end record.
//
// # Contract
//
// Streaming: a Writer holds one block (64 KiB) and a Reader one block (at most
// MaxBlock), whatever the trace's length.
//
// Damage: a truncated, corrupt or foreign file gives an *Error naming the byte
// offset of the damage and one of the sentinel errors (ErrNotTrace,
// ErrVersion, ErrTruncated, ErrChecksum, ErrMalformed). A Reader delivers a
// block's records only after its checksum matched; with ReaderOptions.Salvage
// it ends cleanly (io.EOF) at the first damage and Reader.Damage reports it.
// No input makes a Reader panic or allocate more than about one MaxBlock.
//
// Concurrency: a Writer or Reader is used by one goroutine at a time. A
// Recorder is safe for concurrent use, as the engine.Host it wraps.
//
// Allocation and ownership: Writer.Write copies what it needs from the record
// and allocates nothing in steady state. Reader.Next returns a record owned by
// the Reader, valid until the next call (Record.Page aliases the Reader's
// buffer); it allocates only for RootStart names.
package trace

import (
	"errors"
	"fmt"
	"hash/crc32"
	"time"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/vasmon"
)

// Format constants (FORMAT.md).
const (
	Magic      = "VAStrace" // first 8 bytes of every trace
	Major      = 1          // format version written; readers accept this major only
	Minor      = 0          // minor version written; readers accept any minor of their major
	HeaderSize = 24         // bytes of the v1 header
	FrameSize  = 12         // bytes of a block frame: length, record count, CRC-32C
	MaxBlock   = 1 << 20    // largest block payload a reader accepts
	BlockSize  = 64 << 10   // payload size at which a writer ends a block
	MaxName    = 256        // longest root name recorded
	PageSize   = vasmon.PageSize
)

// Kind is a record's type.
type Kind uint8

// Record kinds. Kind values are never reused; FORMAT.md gives each layout.
const (
	KindVMAdd     Kind = 1
	KindVMRemove  Kind = 2
	KindPage      Kind = 3
	KindRootStart Kind = 4
	KindRootStop  Kind = 5
	KindEvent     Kind = 6
	kindEnd       Kind = 7 // last record of a trace; never returned by Next
)

var kindNames = [...]string{KindVMAdd: "VMAdd", KindVMRemove: "VMRemove", KindPage: "Page",
	KindRootStart: "RootStart", KindRootStop: "RootStop", KindEvent: "Event", kindEnd: "End"}

func (k Kind) String() string {
	if int(k) < len(kindNames) && kindNames[k] != "" {
		return kindNames[k]
	}
	return fmt.Sprintf("Kind(%d)", uint8(k))
}

// Record is one trace record: a flat struct whose Kind says which fields are
// meaningful.
//
//	VMAdd      VM, RAM, MaxTables
//	VMRemove   VM
//	Page       VM, GPA (page-aligned), Page (PageSize bytes)
//	RootStart  VM, CR3, Mode, Monitored, Opts, Name
//	RootStop   VM, CR3
//	Event      VM, GPA, Size (1..8), Data (low Size bytes), Old (if HasOld), HasOld, RIP
type Record struct {
	Kind Kind
	// Time is when it happened, in nanoseconds since Header.Start (an
	// event's trap time). It may go backwards between records: producers
	// stamp events before the recorder serializes them.
	Time      int64
	VM        vasmon.VMID
	RAM       uint64 // VMAdd: guest RAM bytes
	MaxTables int64  // VMAdd: the VM's table budget (0: default)
	GPA       uint64 // Page: the page; Event: first byte written
	Page      []byte // Page: the page's content
	CR3       uint64
	Mode      vasmon.Mode
	Monitored uint64             // RootStart: the bits asked for
	Opts      engine.RootOptions // RootStart
	Name      string             // RootStart: the backend's name for the root, if any
	Size      uint8              // Event
	HasOld    bool               // Event
	Data      uint64             // Event
	Old       uint64             // Event
	RIP       uint64             // Event
}

// Header is a trace's header.
type Header struct {
	Major, Minor uint16    // format version (a Writer writes its own)
	Start        time.Time // wall-clock time of the trace's start (Record.Time 0)
}

// Sentinel errors, wrapped by *Error.
var (
	ErrNotTrace  = errors.New("not a vasengine trace")
	ErrVersion   = errors.New("unsupported trace version")
	ErrTruncated = errors.New("truncated trace")
	ErrChecksum  = errors.New("checksum mismatch")
	ErrMalformed = errors.New("malformed trace")
)

// Error is a damaged or unreadable trace: what is wrong, and where.
type Error struct {
	Offset int64 // byte offset of the damaged header field, block frame or record
	Err    error // one of the sentinels, or an I/O error
	Detail string
}

func (e *Error) Error() string {
	if e.Detail == "" {
		return fmt.Sprintf("trace: offset %d: %v", e.Offset, e.Err)
	}
	return fmt.Sprintf("trace: offset %d: %v: %s", e.Offset, e.Err, e.Detail)
}

func (e *Error) Unwrap() error { return e.Err }

func errorf(off int64, err error, format string, args ...any) *Error {
	return &Error{Offset: off, Err: err, Detail: fmt.Sprintf(format, args...)}
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Root flag bits of a RootStart record.
const (
	flagFullSpace = 1 << iota
	flagIgnoreNullPage
	flagHVMICompat
	flagSerialize
	flagsKnown = 1<<iota - 1
)

// Event head byte: size in the low 4 bits, then these.
const (
	evHasOld = 1 << 4
	evHasRIP = 1 << 5
	evKnown  = 0x3F
)

const maxPFN = 1<<52 - 1
