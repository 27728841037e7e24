//go:build !race

package qemu_test

const raceEnabled = false
