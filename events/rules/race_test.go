//go:build race

package rules

// raceEnabled: the race detector instruments (and allocates for) what the
// allocation tests measure.
const raceEnabled = true
