package proxybench

import (
	"math"
	"slices"
	"testing"
)

func TestRoundRatios(t *testing.T) {
	for _, c := range []struct{ first, other, want []float64 }{
		{nil, nil, nil},
		{[]float64{10, 20}, []float64{5, 10}, []float64{2, 2}},
		{[]float64{10, 20}, []float64{0, 10}, []float64{2}}, // a round the other did not serve
		{[]float64{10}, []float64{5, 10}, []float64{2}},     // a round the first has no figure for
		{[]float64{3, 6, 9}, []float64{3, 3, 3}, []float64{1, 2, 3}},
	} {
		if got := roundRatios(c.first, c.other); !slices.Equal(got, c.want) {
			t.Errorf("roundRatios(%v, %v) = %v, want %v", c.first, c.other, got, c.want)
		}
	}
}

func TestSelected(t *testing.T) {
	targets := []Target{{Name: "node"}, {Name: "nginx"}, {Name: "bare"}, {Name: "direct"}}
	for only, want := range map[string][]string{"": {"node", "nginx", "bare", "direct"}, "node": {"node"}, "node,bare": {"node", "bare"}, "none": nil} {
		t.Setenv("ALEPHVM_PROXYBENCH_ONLY", only)
		var got []string
		for _, tg := range Selected(slices.Clone(targets)) {
			got = append(got, tg.Name)
		}
		if !slices.Equal(got, want) {
			t.Errorf("ONLY=%q: %v, want %v", only, got, want)
		}
	}
}

func TestWonShare(t *testing.T) {
	for _, c := range []struct {
		ratios []float64
		want   float64
	}{
		{[]float64{1}, 1},
		{[]float64{0.99, 1, 1.2, 0.5}, 0.5},
		{[]float64{0.9, 0.8}, 0},
	} {
		if got := wonShare(c.ratios); got != c.want {
			t.Errorf("wonShare(%v) = %v, want %v", c.ratios, got, c.want)
		}
	}
}

func TestMedianInterval(t *testing.T) {
	seq := func(n int) []float64 {
		xs := make([]float64, n)
		for i := range xs {
			xs[i] = float64(n - i) // unsorted on purpose
		}
		return xs
	}
	for _, c := range []struct {
		xs               []float64
		lo, hi, coverage float64
	}{
		{nil, 0, 0, 0},
		{[]float64{1.1}, 1.1, 1.1, 0},
		{seq(5), 1, 5, 1 - 2.0/32},              // too few for 95 %: the whole range, 93.75 %
		{seq(6), 1, 6, 1 - 2.0/64},              // 96.9 %
		{seq(20), 6, 15, 1 - 2*21700.0/1048576}, // P(B(20) <= 5) = 21700/2^20
		{seq(9), 2, 8, 1 - 2*10.0/512},          // P(B(9) <= 1) = 10/512
	} {
		lo, hi, coverage := MedianInterval(c.xs)
		if lo != c.lo || hi != c.hi || math.Abs(coverage-c.coverage) > 1e-12 {
			t.Errorf("MedianInterval(%v) = %v, %v, %v; want %v, %v, %v", c.xs, lo, hi, coverage, c.lo, c.hi, c.coverage)
		}
	}
}
