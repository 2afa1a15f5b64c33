package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/alephvm/alephvm/apiclient"
)

func newTopCmd(a *app) *cobra.Command {
	var interval time.Duration
	var count int
	cmd := &cobra.Command{
		Use:   "top",
		Short: "Watch the node's VMs live: CPU, memory, disk and network rates, busiest first",
		Long: `Show the VMs of the node at --node (default: SUPERVISOR_HOST:SUPERVISOR_PORT),
refreshed every --interval: each VM's CPU (100% is one CPU), memory (resident
in its hypervisor's process, and given), disk read and write rates, network
rates as the guest sees them (received, sent) and uptime, busiest first.

It reads the node's /metrics, which needs no credentials. Rates are over the
last interval; the first screen comes after one. -n stops after that many
screens; Ctrl-C stops it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if interval < 100*time.Millisecond {
				return errors.New("--interval: at least 100ms")
			}
			if count < 0 {
				return errors.New("-n: 0 (no end) or more")
			}
			c, err := a.nodeClient()
			if err != nil {
				return err
			}
			return top(cmd.Context(), c, cmd.OutOrStdout(), interval, count)
		},
	}
	cmd.Flags().DurationVar(&interval, "interval", 2*time.Second, "time between two screens")
	cmd.Flags().IntVarP(&count, "number", "n", 0, "screens to show before exiting (0: until Ctrl-C)")
	cmd.Flags().StringVar(&a.vmCreds.node, "node", "", "URL of the node (default: http://SUPERVISOR_HOST:SUPERVISOR_PORT)")
	a.bindCommandSettings(cmd)
	return cmd
}

// top shows count screens (0: until ctx ends), one every interval. On a
// terminal each screen replaces the last; elsewhere they follow each other.
func top(ctx context.Context, c *apiclient.Client, out io.Writer, interval time.Duration, count int) error {
	f, isFile := out.(*os.File)
	clear := isFile && isTerminal(f)
	prev, err := c.Usage(ctx)
	if err != nil {
		return err
	}
	for shown := 0; count == 0 || shown < count; shown++ {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(interval):
		}
		cur, err := c.Usage(ctx)
		if errors.Is(err, context.Canceled) {
			return nil
		} else if err != nil {
			return err
		}
		var screen strings.Builder
		if clear {
			screen.WriteString("\x1b[H\x1b[2J")
		} else if shown > 0 {
			screen.WriteString("\n")
		}
		writeTop(&screen, c.Base(), cur, cur.RatesSince(prev))
		if _, err := io.WriteString(out, screen.String()); err != nil {
			return err
		}
		prev = cur
	}
	return nil
}

func writeTop(w io.Writer, node string, u apiclient.Usage, rates []apiclient.Rates) {
	running := 0
	var cpu float64
	for _, r := range rates {
		if r.Up {
			running++
		}
		cpu += r.CPUPercent
	}
	fmt.Fprintf(w, "alephvm top  %s  %s  %d VMs running of %d, CPU %.0f%%\n\n", node, u.At.Format("15:04:05"), running, len(rates), cpu)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "HASH\tTYPE\tCPU%\tMEM USED\tMEM GIVEN\tDISK READ/s\tDISK WRITE/s\tNET RX/s\tNET TX/s\tUPTIME\t")
	for _, r := range rates {
		if !r.Up {
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%.1f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", r.Ref[:min(12, len(r.Ref))], r.Type, r.CPUPercent,
			humanBytes(float64(r.MemoryUsed)), humanBytes(float64(r.MemoryAssigned)), humanBytes(r.DiskReadPerSec), humanBytes(r.DiskWritePerSec),
			humanBytes(r.NetReceivedPerSec), humanBytes(r.NetSentPerSec), uptime(r.Uptime))
	}
	tw.Flush()
}

// humanBytes shows a size or a rate in B, KiB, MiB, GiB.
func humanBytes(n float64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB"}
	i := 0
	for n >= 1024 && i < len(units)-1 {
		n /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%.0f B", n)
	}
	return fmt.Sprintf("%.1f %s", n, units[i])
}

// uptime shows how long a VM has run: 3d4h, 2h05m, 4m10s, 12s.
func uptime(d time.Duration) string {
	d = d.Round(time.Second)
	switch h := int(d.Hours()); {
	case h >= 24:
		return fmt.Sprintf("%dd%dh", h/24, h%24)
	case h > 0:
		return fmt.Sprintf("%dh%02dm", h, int(d.Minutes())%60)
	case d >= time.Minute:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	}
	return fmt.Sprintf("%ds", int(d.Seconds()))
}
