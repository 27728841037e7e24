package kvm

import (
	"encoding/binary"
	"fmt"
)

// A tiny x86 encoder, just big enough for the guest program (guest.go). It
// emits the same instructions in 64-bit mode (operands are 64-bit: REX.W)
// and in 32-bit protected mode (operands are 32-bit, no REX), so one program
// generator serves every paging mode. Only the eight legacy registers are
// used, so no other REX bit is ever needed. Memory operands are always
// encoded with a 32-bit displacement (and a SIB byte when there is an index
// or no base): bigger code, simpler encoder.

// reg is a general-purpose register (the low three bits of its number).
type reg uint8

const (
	rAX reg = iota
	rCX
	rDX
	rBX
	rSP
	rBP
	rSI
	rDI
	noReg reg = 0xFF
)

// mem is a memory operand [base + index*scale + disp]; base may be noReg
// (absolute, sign-extended disp32 in 64-bit mode).
type mem struct {
	base, index reg
	scale       uint8 // 1, 2, 4 or 8 (with an index)
	disp        int32
}

// at returns [base + disp].
func at(base reg, disp int32) mem { return mem{base: base, index: noReg, disp: disp} }

// idx returns [base + index*scale + disp].
func idx(base, index reg, scale uint8, disp int32) mem {
	return mem{base: base, index: index, scale: scale, disp: disp}
}

// abs returns [disp].
func abs(disp int32) mem { return mem{base: noReg, index: noReg, disp: disp} }

// cond is a condition code of jcc.
type cond uint8

const (
	ccE  cond = 0x4 // equal / zero
	ccNE cond = 0x5 // not equal / not zero
	ccB  cond = 0x2 // unsigned below
	ccAE cond = 0x3 // unsigned above or equal
)

// alu operations (the /digit of opcodes 0x81 and the row of 0x01..0x39).
type aluOp uint8

const (
	opAdd aluOp = 0
	opOr  aluOp = 1
	opAnd aluOp = 4
	opSub aluOp = 5
	opXor aluOp = 6
	opCmp aluOp = 7
)

type label int

type fixup struct {
	at int   // offset of the rel32 field
	l  label // target
}

// asm accumulates machine code.
type asm struct {
	long   bool // 64-bit mode (REX.W on every operation)
	code   []byte
	labels []int // offset, -1 while unbound
	fixups []fixup
}

func newAsm(long bool) *asm { return &asm{long: long} }

func (a *asm) emit(b ...byte) { a.code = append(a.code, b...) }

func (a *asm) imm32(v int32) { a.code = binary.LittleEndian.AppendUint32(a.code, uint32(v)) }

// w emits REX.W in 64-bit mode.
func (a *asm) w() {
	if a.long {
		a.emit(0x48)
	}
}

// modrmReg emits a register-direct ModRM byte.
func (a *asm) modrmReg(r uint8, rm reg) { a.emit(0xC0 | r<<3 | uint8(rm)) }

// modrmMem emits the ModRM (and SIB) and disp32 of a memory operand.
func (a *asm) modrmMem(r uint8, m mem) {
	scale := map[uint8]uint8{0: 0, 1: 0, 2: 1, 4: 2, 8: 3}[m.scale]
	switch {
	case m.base == noReg: // [disp32]: SIB with no base and no index
		a.emit(0x04|r<<3, 0x25)
		if m.index != noReg {
			panic("asm: index without base")
		}
	case m.index != noReg:
		if m.index == rSP {
			panic("asm: rsp cannot be an index")
		}
		a.emit(0x84|r<<3, scale<<6|uint8(m.index)<<3|uint8(m.base))
	case m.base == rSP:
		a.emit(0x84|r<<3, 0x24)
	default:
		a.emit(0x80 | r<<3 | uint8(m.base))
	}
	a.imm32(m.disp)
}

// movRR: dst = src.
func (a *asm) movRR(dst, src reg) { a.w(); a.emit(0x89); a.modrmReg(uint8(src), dst) }

// movRI: dst = v (sign-extended imm32 in 64-bit mode).
func (a *asm) movRI(dst reg, v int32) {
	if a.long {
		a.emit(0x48, 0xC7)
		a.modrmReg(0, dst)
	} else {
		a.emit(0xB8 + uint8(dst))
	}
	a.imm32(v)
}

// load: dst = [m] (a word: 8 bytes in 64-bit mode, 4 otherwise).
func (a *asm) load(dst reg, m mem) { a.w(); a.emit(0x8B); a.modrmMem(uint8(dst), m) }

// store: [m] = src (a word).
func (a *asm) store(m mem, src reg) { a.w(); a.emit(0x89); a.modrmMem(uint8(src), m) }

// storeI: [m] = v (a word; sign-extended in 64-bit mode).
func (a *asm) storeI(m mem, v int32) { a.w(); a.emit(0xC7); a.modrmMem(0, m); a.imm32(v) }

// lea: dst = address of m.
func (a *asm) lea(dst reg, m mem) { a.w(); a.emit(0x8D); a.modrmMem(uint8(dst), m) }

// aluRR: dst op= src.
func (a *asm) aluRR(op aluOp, dst, src reg) {
	a.w()
	a.emit(uint8(op)<<3 | 0x01)
	a.modrmReg(uint8(src), dst)
}

// aluRI: dst op= v (sign-extended).
func (a *asm) aluRI(op aluOp, dst reg, v int32) {
	a.w()
	if v >= -128 && v <= 127 {
		a.emit(0x83)
		a.modrmReg(uint8(op), dst)
		a.emit(uint8(int8(v)))
		return
	}
	a.emit(0x81)
	a.modrmReg(uint8(op), dst)
	a.imm32(v)
}

// aluRM: dst op= [m].
func (a *asm) aluRM(op aluOp, dst reg, m mem) {
	a.w()
	a.emit(uint8(op)<<3 | 0x03)
	a.modrmMem(uint8(dst), m)
}

// testRI sets flags from dst & v.
func (a *asm) testRI(dst reg, v int32) { a.w(); a.emit(0xF7); a.modrmReg(0, dst); a.imm32(v) }

// shl and shr shift dst by n bits.
func (a *asm) shl(dst reg, n uint8) { a.w(); a.emit(0xC1); a.modrmReg(4, dst); a.emit(n) }
func (a *asm) shr(dst reg, n uint8) { a.w(); a.emit(0xC1); a.modrmReg(5, dst); a.emit(n) }

// incM and decM add 1 to or subtract 1 from the word at m.
func (a *asm) incM(m mem) { a.w(); a.emit(0xFF); a.modrmMem(0, m) }
func (a *asm) decM(m mem) { a.w(); a.emit(0xFF); a.modrmMem(1, m) }

// movToCR3 loads CR3 from r (operand size is the mode's, no REX needed).
func (a *asm) movToCR3(r reg) { a.emit(0x0F, 0x22); a.modrmReg(3, r) }

// outDX writes eax to the I/O port in dx.
func (a *asm) outDX() { a.emit(0xEF) }

func (a *asm) hlt() { a.emit(0xF4) }
func (a *asm) ret() { a.emit(0xC3) }

// newLabel returns an unbound label.
func (a *asm) newLabel() label {
	a.labels = append(a.labels, -1)
	return label(len(a.labels) - 1)
}

// bind binds l to the current offset.
func (a *asm) bind(l label) {
	if a.labels[l] >= 0 {
		panic("asm: label bound twice")
	}
	a.labels[l] = len(a.code)
}

// here returns a new label bound to the current offset.
func (a *asm) here() label { l := a.newLabel(); a.bind(l); return l }

func (a *asm) rel32(l label) {
	a.fixups = append(a.fixups, fixup{at: len(a.code), l: l})
	a.imm32(0)
}

func (a *asm) jmp(l label)          { a.emit(0xE9); a.rel32(l) }
func (a *asm) jcc(c cond, l label)  { a.emit(0x0F, 0x80|uint8(c)); a.rel32(l) }
func (a *asm) call(l label)         { a.emit(0xE8); a.rel32(l) }
func (a *asm) cmpRI(r reg, v int32) { a.aluRI(opCmp, r, v) }

// finish resolves the labels and returns the code.
func (a *asm) finish() ([]byte, error) {
	for _, f := range a.fixups {
		to := a.labels[f.l]
		if to < 0 {
			return nil, fmt.Errorf("asm: label %d never bound", f.l)
		}
		binary.LittleEndian.PutUint32(a.code[f.at:], uint32(int32(to-(f.at+4))))
	}
	return a.code, nil
}
