// Command vasengine runs the sharded page-table monitor on a host: on
// simulated guests (the default), real KVM guests, real Linux guests under
// QEMU, or a recorded trace; it plans capacity from measurements and records
// and replays event traces. Run "vasengine help" for the commands.
package main

import (
	"fmt"
	"io"
	"os"
)

const usage = `usage: vasengine <command> [flags]

commands:
  run      monitor guests (default backend: the simulator) and print a summary
  record   like run, and write every event to a trace file (-o FILE)
  replay   replay a trace file into the engine (vasengine replay [flags] FILE)
  plan     how many VMs this host can monitor within a latency budget
  help     this text; "vasengine <command> -h" lists a command's flags
`

func main() {
	os.Exit(Main(os.Args[1:], os.Stdout, os.Stderr))
}

// Main runs the command line args and returns the exit status: 0 on
// success, 1 when the work failed, 2 for a usage error.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		args = []string{"run"}
	}
	var err error
	switch cmd, rest := args[0], args[1:]; cmd {
	case "run":
		err = cmdRun(rest, stdout, stderr, false)
	case "record":
		err = cmdRun(rest, stdout, stderr, true)
	case "replay":
		err = cmdReplay(rest, stdout, stderr)
	case "plan":
		err = cmdPlan(rest, stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "vasengine: unknown command %q (try \"vasengine help\")\n", cmd)
		return 2
	}
	if err == nil {
		return 0
	}
	fmt.Fprintf(stderr, "vasengine: %v\n", err)
	if _, ok := err.(usageError); ok {
		return 2
	}
	return 1
}

// usageError is a bad flag or an impossible configuration.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }
