package shard

import (
	"slices"
	"strings"
	"testing"
)

func TestParseCPUList(t *testing.T) {
	for _, c := range []struct {
		in   string
		want []int
		err  string // substring of the error; "" if none
	}{
		{in: "0", want: []int{0}},
		{in: "0-3,6,8-9", want: []int{0, 1, 2, 3, 6, 8, 9}},
		{in: "8-9,0-1", want: []int{0, 1, 8, 9}},
		{in: "5-5", want: []int{5}},
		{in: " 0-1, 4\n", want: []int{0, 1, 4}},
		{in: "", err: "empty CPU list"},
		{in: "  ", err: "empty CPU list"},
		{in: "1,,2", err: "empty element"},
		{in: "1,", err: "empty element"},
		{in: "3-1", err: "reversed range"},
		{in: "-1", err: "negative"},
		{in: "0--1", err: "negative"},
		{in: "1-", err: "missing"},
		{in: "0-1-2", err: "not a CPU number"},
		{in: "a", err: "not a CPU number"},
		{in: "+1", err: "not a CPU number"},
		{in: "0-x", err: "not a CPU number"},
		{in: "1,1", err: "CPU 1 listed twice"},
		{in: "0-3,2", err: "CPU 2 listed twice"},
		{in: "0-99999999", err: "above"},
	} {
		got, err := ParseCPUList(c.in)
		switch {
		case c.err == "" && err != nil:
			t.Errorf("ParseCPUList(%q): %v", c.in, err)
		case c.err == "" && !slices.Equal(got, c.want):
			t.Errorf("ParseCPUList(%q) = %v, want %v", c.in, got, c.want)
		case c.err != "" && err == nil:
			t.Errorf("ParseCPUList(%q) = %v, want error containing %q", c.in, got, c.err)
		case c.err != "" && !strings.Contains(err.Error(), c.err):
			t.Errorf("ParseCPUList(%q) error %q, want it to contain %q", c.in, err, c.err)
		}
	}
}

func TestFormatCPUList(t *testing.T) {
	for _, s := range []string{"0", "0-3,6,8-9", "1,3,5", "0-1023"} {
		cpus, err := ParseCPUList(s)
		if err != nil {
			t.Fatal(err)
		}
		if got := formatCPUList(cpus); got != s {
			t.Errorf("formatCPUList(ParseCPUList(%q)) = %q", s, got)
		}
	}
}
