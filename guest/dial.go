package guest

import (
	"context"
	"fmt"
	"net"
)

// DialSerial connects to the unix socket QEMU serves for the control
// port:
//
//	-device virtio-serial-pci
//	-chardev socket,id=control,path=PATH,server=on,wait=off
//	-device virtserialport,chardev=control,name=org.alephvm.control
//
// QEMU takes one connection at a time; the guest sees a new session when
// the previous one is closed.
func DialSerial(ctx context.Context, path string) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("dial guest control socket: %w", err)
	}
	return conn, nil
}
