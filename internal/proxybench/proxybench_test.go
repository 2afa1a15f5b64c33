package proxybench

import (
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
