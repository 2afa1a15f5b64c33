// Package guest owns the contract between the host and alephvm-init, the
// PID 1 of every program VM: what the init is told and how the host talks
// to it once it runs. Both sides import it.
//
// Boot: the VM boots the kernel with KernelCmdline and the initramfs built
// by package assets (alephvm-init and the kernel modules it loads). The
// first virtio block device (vda) is the config drive, written by
// WriteConfigDrive; the others are Config.Drives in order, Drives[i] being
// DeviceName(i). Firecracker has no drive serials, so drives are named by
// position under both hypervisors: attach the config drive first, then
// Config.Drives in order, and mark none of them as Firecracker's root
// device (the kernel boots from the initramfs).
//
// Control: the init serves a line-oriented JSON protocol (one request or
// reply per line, ids matching replies to requests, events without id) on
// a virtio-serial port named ControlPortName under QEMU, and on vsock port
// ControlVsockPort under Firecracker. The host connects through its VM's
// backend (DialSerial here for QEMU's socket; firecracker.DialVsock for
// Firecracker's vsock handshake) and drives the session with a Client: Status, Logs, Signal,
// Exec, Sysinfo, Halt and the asynchronous Events. docs/guest-protocol.md
// describes the bytes.
package guest
