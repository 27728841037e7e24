package shard

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// maxCPU is the largest CPU number ParseCPUList accepts. It bounds the
// memory a hostile range such as "0-999999999" can make it allocate.
const maxCPU = 1<<16 - 1

// ParseCPUList parses a CPU list in the Linux cpuset format, a
// comma-separated list of CPU numbers and inclusive ranges such as
// "0-3,6,8-9", as found in /sys/devices/system/cpu/online or taken by
// taskset -c. White space around elements is ignored. It returns the CPUs in
// ascending order. An empty list, an empty element, a negative or
// non-numeric CPU, a reversed range such as "3-1" and a CPU listed twice are
// errors. The stride form "0-7:2" is not supported.
func ParseCPUList(s string) ([]int, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, fmt.Errorf("shard: empty CPU list")
	}
	var cpus []int
	for elem := range strings.SplitSeq(s, ",") {
		elem = strings.TrimSpace(elem)
		lo, hi, isRange := strings.Cut(elem, "-")
		first, err := parseCPU(elem, lo)
		if err != nil {
			return nil, err
		}
		last := first
		if isRange {
			if last, err = parseCPU(elem, hi); err != nil {
				return nil, err
			}
			if last < first {
				return nil, fmt.Errorf("shard: CPU list %q: reversed range %q", s, elem)
			}
		}
		for c := first; c <= last; c++ {
			cpus = append(cpus, c)
		}
	}
	slices.Sort(cpus)
	for i := 1; i < len(cpus); i++ {
		if cpus[i] == cpus[i-1] {
			return nil, fmt.Errorf("shard: CPU list %q: CPU %d listed twice", s, cpus[i])
		}
	}
	return cpus, nil
}

// parseCPU parses one CPU number, field, of the list element elem.
func parseCPU(elem, field string) (int, error) {
	switch {
	case elem == "":
		return 0, fmt.Errorf("shard: CPU list has an empty element")
	case strings.HasPrefix(elem, "-") || strings.HasPrefix(field, "-"):
		return 0, fmt.Errorf("shard: CPU list element %q: negative CPU number", elem)
	case field == "":
		return 0, fmt.Errorf("shard: CPU list element %q: missing CPU number", elem)
	}
	n, err := strconv.ParseUint(field, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("shard: CPU list element %q: %q is not a CPU number", elem, field)
	}
	if n > maxCPU {
		return 0, fmt.Errorf("shard: CPU list element %q: CPU %d is above %d", elem, n, maxCPU)
	}
	return int(n), nil
}

// formatCPUList formats ascending CPUs in the form ParseCPUList parses.
func formatCPUList(cpus []int) string {
	var b strings.Builder
	for i := 0; i < len(cpus); {
		j := i
		for j+1 < len(cpus) && cpus[j+1] == cpus[j]+1 {
			j++
		}
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.Itoa(cpus[i]))
		if j > i {
			b.WriteByte('-')
			b.WriteString(strconv.Itoa(cpus[j]))
		}
		i = j + 1
	}
	return b.String()
}
