//go:build race

package sim_test

// raceEnabled: the race detector slows the simulator's stores far more than
// the engine, which changes how far the engine lags behind (see
// TestLinuxCalibration).
const raceEnabled = true
