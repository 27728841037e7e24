// Command rwx is a program of the QEMU test guest's initramfs (built by
// scripts/qemu-setup.sh, run by backends/qemu/guest/init for the workload
// rwx): it makes user pages writable and executable at once, as a JIT or
// an exploit would, so that the tests see the built-in rule wx-user-page
// (events/rules/default.yaml) fire on a real Linux guest. It maps 8
// anonymous pages read-write-execute and writes each (a present, writable,
// executable PTE per page), and makes one more read-write page executable
// (mprotect: the PTE gains X). It exits 0, or 1 if the kernel refused.
package main

import (
	"os"
	"syscall"
)

const pages = 8

func main() {
	rwx := syscall.PROT_READ | syscall.PROT_WRITE | syscall.PROT_EXEC
	b, err := syscall.Mmap(-1, 0, pages*4096, rwx, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		os.Exit(1)
	}
	for i := 0; i < pages; i++ {
		b[i*4096] = 0xC3 // ret
	}
	c, err := syscall.Mmap(-1, 0, 4096, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		os.Exit(1)
	}
	c[0] = 0xC3
	if err := syscall.Mprotect(c, rwx); err != nil {
		os.Exit(1)
	}
	c[1] = 0xC3
}
