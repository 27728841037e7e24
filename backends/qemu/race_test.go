//go:build race

package qemu_test

const raceEnabled = true
