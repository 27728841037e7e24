package vasmon

import "fmt"

// Mode is a guest paging mode. All mode-specific behaviour of the package is
// read from one table of parameters (modeTable); no code path is duplicated
// per mode.
type Mode uint8

// The four x86 paging modes.
const (
	Mode32  Mode = iota + 1 // 32-bit paging (CR4.PAE=0, PSE): 2 levels, 4-byte entries, 4 MiB pages
	ModePAE                 // PAE paging: 3 levels, 32-byte root (PDPT), 2 MiB pages
	Mode4                   // 4-level paging: 2 MiB and 1 GiB pages, VAs sign-extended from bit 47
	Mode5                   // 5-level paging (LA57): VAs sign-extended from bit 56
)

// Entry bits shared by every mode (Intel SDM vol. 3A, chapter 4).
const (
	BitP   uint64 = 1 << 0
	BitRW  uint64 = 1 << 1
	BitUS  uint64 = 1 << 2
	BitPWT uint64 = 1 << 3
	BitPCD uint64 = 1 << 4
	BitA   uint64 = 1 << 5
	BitD   uint64 = 1 << 6
	BitPS  uint64 = 1 << 7
	BitG   uint64 = 1 << 8
	BitNX  uint64 = 1 << 63
)

// PageSize is the size of the page-table pages that are write-protected.
const PageSize = 4096

// modeParams describes one paging mode as data.
type modeParams struct {
	name        string
	levels      uint8  // number of paging levels
	entryBytes  uint8  // 4 or 8
	indexBits   uint8  // index bits per level: 10 or 9
	rootEntries uint16 // entries of the root table (4 for the PAE PDPT)
	userEntries uint16 // root indices below this are the user half
	largeLevels uint8  // bit L set: PS is valid at level L (a leaf)
	vaBits      uint8  // canonical VA width (sign bit = vaBits-1); 0: 32-bit VAs, no extension
	rootMask    uint64 // CR3 bits that locate the root table
	addrMask    uint64 // entry bits that hold the address of the next table
}

var modeTable = [...]modeParams{
	Mode32: {
		name: "32-bit", levels: 2, entryBytes: 4, indexBits: 10,
		rootEntries: 1024, userEntries: 512, largeLevels: 1 << 2,
		rootMask: 0xFFFFF000, addrMask: 0xFFFFF000,
	},
	ModePAE: {
		name: "pae", levels: 3, entryBytes: 8, indexBits: 9,
		rootEntries: 4, userEntries: 2, largeLevels: 1 << 2,
		rootMask: 0xFFFFFFE0, addrMask: 0x000FFFFFFFFFF000,
	},
	Mode4: {
		name: "4-level", levels: 4, entryBytes: 8, indexBits: 9,
		rootEntries: 512, userEntries: 256, largeLevels: 1<<2 | 1<<3, vaBits: 48,
		rootMask: 0x000FFFFFFFFFF000, addrMask: 0x000FFFFFFFFFF000,
	},
	Mode5: {
		name: "5-level", levels: 5, entryBytes: 8, indexBits: 9,
		rootEntries: 512, userEntries: 256, largeLevels: 1<<2 | 1<<3, vaBits: 57,
		rootMask: 0x000FFFFFFFFFF000, addrMask: 0x000FFFFFFFFFF000,
	},
}

// Modes lists every supported paging mode, for table-driven tests and flags.
var Modes = []Mode{Mode32, ModePAE, Mode4, Mode5}

func (m Mode) valid() bool { return m >= Mode32 && m <= Mode5 }

func (m Mode) p() *modeParams { return &modeTable[m] }

// String returns the mode's name as accepted by ParseMode.
func (m Mode) String() string {
	if !m.valid() {
		return fmt.Sprintf("Mode(%d)", uint8(m))
	}
	return m.p().name
}

// ParseMode parses a mode name ("32-bit", "pae", "4-level", "5-level"; also
// "32", "4", "5").
func ParseMode(s string) (Mode, error) {
	switch s {
	case "32", "32-bit", "32bit":
		return Mode32, nil
	case "pae", "PAE":
		return ModePAE, nil
	case "4", "4-level", "4level":
		return Mode4, nil
	case "5", "5-level", "5level", "la57":
		return Mode5, nil
	}
	return 0, fmt.Errorf("vasmon: unknown paging mode %q (want 32-bit, pae, 4-level or 5-level)", s)
}

// Levels returns the number of paging levels.
func (m Mode) Levels() int { return int(m.p().levels) }

// EntryBytes returns the size of one entry: 4 or 8.
func (m Mode) EntryBytes() int { return int(m.p().entryBytes) }

// Entries returns the number of entries of a table at level (1 = leaf tables).
func (m Mode) Entries(level int) int {
	p := m.p()
	if level == int(p.levels) {
		return int(p.rootEntries)
	}
	return 1 << p.indexBits
}

// UserEntries returns how many root entries map the user half.
func (m Mode) UserEntries() int { return int(m.p().userEntries) }

// TableBytes returns the size of a table at level in guest memory.
func (m Mode) TableBytes(level int) int { return m.Entries(level) * m.EntryBytes() }

// Shift returns log2 of the span of one entry of a table at level.
func (m Mode) Shift(level int) uint {
	return 12 + uint(m.p().indexBits)*uint(level-1)
}

// EntrySpan returns the bytes of address space one entry at level maps; for a
// large-page entry it is the page size.
func (m Mode) EntrySpan(level int) uint64 { return 1 << m.Shift(level) }

// LargeOK reports whether PS marks a large page at level.
func (m Mode) LargeOK(level int) bool { return m.p().largeLevels&(1<<level) != 0 }

// RootGPA returns the guest-physical address of the root table named by cr3.
func (m Mode) RootGPA(cr3 uint64) uint64 { return cr3 & m.p().rootMask }

// TableAddr returns the address of the next-level table held in entry e.
func (m Mode) TableAddr(e uint64) uint64 { return e & m.p().addrMask }

// Canonical sign-extends va from the mode's top VA bit (bit 47 for 4-level,
// bit 56 for 5-level); 32-bit and PAE addresses are returned unchanged.
func (m Mode) Canonical(va uint64) uint64 {
	b := m.p().vaBits
	if b == 0 {
		return va & 0xFFFFFFFF
	}
	sh := 64 - b
	return uint64(int64(va<<sh) >> sh)
}

// EntryVA returns the first VA mapped by entry i of a table at level whose
// first VA is base (before canonicalisation of base; the result is canonical).
func (m Mode) EntryVA(base uint64, level, i int) uint64 {
	return m.Canonical(base | uint64(i)<<m.Shift(level))
}

// Kind classifies an entry value at a level.
type Kind uint8

// Entry kinds. Reserved is a present entry that sets PS at a level where PS
// is reserved: the CPU faults on it, so it maps nothing and links nothing.
const (
	KindNone Kind = iota
	KindLeaf
	KindTable
	KindReserved
)

// Classify returns the kind of entry e at level.
func (m Mode) Classify(e uint64, level int) Kind {
	if e&BitP == 0 {
		return KindNone
	}
	if level == 1 {
		return KindLeaf
	}
	if e&BitPS != 0 {
		if m.LargeOK(level) {
			return KindLeaf
		}
		return KindReserved
	}
	return KindTable
}

// structuralMask returns the entry bits whose change can change the tree:
// P, PS and the table address.
func (m Mode) structuralMask() uint64 { return BitP | BitPS | m.p().addrMask }
