package main

import (
	"io"
)

func cmdPlan(args []string, stdout, stderr io.Writer) error {
	return usagef("plan: not wired into this build yet")
}
