package kvm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/vasengine/vasengine/vasmon"
)

// TestEncoder checks the encoder against encodings produced by GNU as
// (checked with objdump when the encoder was written).
func TestEncoder(t *testing.T) {
	for _, tc := range []struct {
		long bool
		emit func(a *asm)
		want string
	}{
		{true, func(a *asm) { a.load(rAX, at(rBP, 8)) }, "48 8b 85 08 00 00 00"}, // mov 0x8(%rbp),%rax
		{true, func(a *asm) { a.cmpRI(rAX, 0) }, "48 83 f8 00"},                  // cmp $0,%rax
		{true, func(a *asm) { a.decM(at(rBP, 8)) }, "48 ff 8d 08 00 00 00"},      // decq 0x8(%rbp)
		{true, func(a *asm) { a.lea(rBX, idx(rBP, rAX, 1, 0x1100)) }, "48 8d 9c 05 00 11 00 00"},
		{true, func(a *asm) { a.shl(rAX, 11) }, "48 c1 e0 0b"},
		{true, func(a *asm) { a.aluRI(opOr, rAX, -0x80000000) }, "48 81 c8 00 00 00 80"}, // or $0xffffffff80000000,%rax
		{true, func(a *asm) { a.lea(rAX, idx(rAX, rCX, 8, 0)) }, "48 8d 84 c8 00 00 00 00"},
		{true, func(a *asm) { a.storeI(at(rSI, 0x28), 0xe7) }, "48 c7 86 28 00 00 00 e7 00 00 00"},
		{true, func(a *asm) { a.aluRM(opOr, rCX, at(rSI, 0x28)) }, "48 0b 8e 28 00 00 00"},
		{true, func(a *asm) { a.store(at(rDI, 0), rCX) }, "48 89 8f 00 00 00 00"},
		{true, func(a *asm) { a.movRI(rDX, 0) }, "48 c7 c2 00 00 00 00"},
		{true, func(a *asm) { a.movToCR3(rAX) }, "0f 22 d8"},
		{true, func(a *asm) { a.testRI(rCX, 1) }, "48 f7 c1 01 00 00 00"},
		{true, func(a *asm) { a.aluRR(opCmp, rSI, rAX) }, "48 39 c6"},
		{true, func(a *asm) { a.load(rAX, abs(-0x7ffff000)) }, "48 8b 04 25 00 10 00 80"},
		{true, func(a *asm) { a.load(rAX, at(rSP, 8)) }, "48 8b 84 24 08 00 00 00"},
		{false, func(a *asm) { a.load(rDX, at(rSI, 4)) }, "8b 96 04 00 00 00"}, // mov 0x4(%esi),%edx
		{false, func(a *asm) { a.shr(rDX, 30) }, "c1 ea 1e"},
		{false, func(a *asm) { a.aluRI(opAnd, rDX, 3) }, "83 e2 03"},
		{false, func(a *asm) { a.lea(rDI, idx(rAX, rDX, 8, 0)) }, "8d bc d0 00 00 00 00"},
		{false, func(a *asm) { a.movRI(rDX, 0xe1) }, "ba e1 00 00 00"},
		{false, func(a *asm) { a.aluRI(opOr, rAX, -0x40000000) }, "81 c8 00 00 00 c0"},
		{false, func(a *asm) { a.outDX(); a.hlt(); a.ret() }, "ef f4 c3"},
	} {
		a := newAsm(tc.long)
		tc.emit(a)
		got, err := a.finish()
		if err != nil {
			t.Fatal(err)
		}
		if s := hexBytes(got); s != tc.want {
			t.Errorf("long=%v: got %s, want %s", tc.long, s, tc.want)
		}
	}
}

func hexBytes(b []byte) string {
	var s bytes.Buffer
	for i, c := range b {
		if i > 0 {
			s.WriteByte(' ')
		}
		fmt.Fprintf(&s, "%02x", c)
	}
	return s.String()
}

// TestLabels checks forward and backward branches.
func TestLabels(t *testing.T) {
	a := newAsm(true)
	top := a.here()
	fwd := a.newLabel()
	a.jcc(ccE, fwd) // 6 bytes: to offset 11
	a.jmp(top)      // 5 bytes at 6: rel -11
	a.bind(fwd)
	a.call(top) // at 11: rel -16
	got, err := a.finish()
	if err != nil {
		t.Fatal(err)
	}
	if want := "0f 84 05 00 00 00 e9 f5 ff ff ff e8 f0 ff ff ff"; hexBytes(got) != want {
		t.Fatalf("got %s, want %s", hexBytes(got), want)
	}
	b := newAsm(true)
	b.jmp(b.newLabel())
	if _, err := b.finish(); err == nil {
		t.Fatal("unbound label not reported")
	}
}

// TestGuestImage checks what the host prepares for each paging mode (the
// program assembles; boot tables map the kernel half; every vCPU gets its
// own share of the pool; data frames carry their tags), without KVM.
func TestGuestImage(t *testing.T) {
	for _, m := range []vasmon.Mode{vasmon.Mode4, vasmon.ModePAE, vasmon.Mode32} {
		l, err := layoutOf(m)
		if err != nil {
			t.Fatal(err)
		}
		code, err := genGuest(l)
		if err != nil || len(code) < 1000 {
			t.Fatalf("%v: %d bytes: %v", m, len(code), err)
		}
		ram := make([]byte, ramSize)
		l.initMemory(ram, code, 4, 1, 10)
		if !bytes.Equal(ram[codePhys:codePhys+len(code)], code) {
			t.Fatalf("%v: code not loaded", m)
		}
		pages := map[uint64]int{}
		for c := 0; c < 4; c++ {
			a := ram[cpuArea(c):]
			n := int(l.word64(a[wFreeN*l.word:]))
			if n != poolPages/4 || l.word64(a[wIters*l.word:]) != 10 || l.word64(a[wRng*l.word:]) == 0 {
				t.Fatalf("%v: vCPU %d area: %d free pages", m, c, n)
			}
			for i := 0; i < n; i++ {
				p := l.word64(a[(wFree+i)*l.word:])
				if p < poolPhys || p >= poolPhys+poolPages*4096 || p%4096 != 0 {
					t.Fatalf("%v: free page %#x outside the pool", m, p)
				}
				pages[p]++
			}
		}
		if len(pages) != poolPages {
			t.Fatalf("%v: %d distinct pool pages handed out, want %d", m, len(pages), poolPages)
		}
		// The kernel half maps code at kva(codePhys): walk the boot tables.
		if got := walkBoot(t, l, ram, l.kva(codePhys)); got != codePhys {
			t.Fatalf("%v: kernel VA of the code translates to %#x", m, got)
		}
		if got := binary.LittleEndian.Uint64(ram[smallPhys+5*4096:]); got != smallPhys+5*4096 {
			t.Fatalf("%v: data frame tag %#x", m, got)
		}
		for s := 0; s < nSlot; s++ {
			if va := l.slotVA(s); m.Canonical(va) != va || va>>l.largeSh<<l.largeSh != va || !inUserHalf(m, va) {
				t.Fatalf("%v: slot %d VA %#x", m, s, va)
			}
		}
	}
}

func inUserHalf(m vasmon.Mode, va uint64) bool {
	switch m {
	case vasmon.Mode4:
		return va < 1<<47
	default:
		return va < 1<<31
	}
}

// walkBoot translates va through the boot tables.
func walkBoot(t *testing.T, l *layout, ram []byte, va uint64) uint64 {
	t.Helper()
	table := uint64(bootRoot)
	for level := l.levels; level >= 1; level-- {
		bits := uint(9)
		if l.esz == 4 {
			bits = 10
		}
		shift := 12 + bits*uint(level-1)
		i := va >> shift & (1<<bits - 1)
		if l.mode == vasmon.ModePAE && level == 3 {
			i = va >> 30 & 3
		}
		var e uint64
		if l.esz == 8 {
			e = binary.LittleEndian.Uint64(ram[table+i*8:])
		} else {
			e = uint64(binary.LittleEndian.Uint32(ram[table+i*4:]))
		}
		if e&vasmon.BitP == 0 {
			t.Fatalf("%v: %#x not mapped at level %d", l.mode, va, level)
		}
		if e&vasmon.BitPS != 0 && level > 1 {
			return e&^(1<<shift-1)&0xFFFFFFFFFF000 + va&(1<<shift-1)
		}
		table = e & 0xFFFFFFFFFF000
	}
	return table + va&0xFFF
}
