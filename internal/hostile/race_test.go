//go:build race

package hostile

// The race detector's runtime allocates beside the code: allocation
// bounds are not checked under it.
const raceEnabled = true
