// Command bootinit is the init of the boot test's initramfs: it says it
// ran on the serial console, then waits for ctrl-alt-del, which the
// kernel turns into a reboot (this init handles no signal), and a reboot
// ends Firecracker.
package main

import (
	"fmt"
	"os"
	"time"
)

func main() {
	fmt.Printf("alephvm-boot-test: init ran as pid %d\n", os.Getpid())
	for {
		// Not select{}: with no goroutine left, Go would end the init,
		// and the kernel panics when its init exits.
		time.Sleep(time.Hour)
	}
}
