package metrics

import (
	"context"
	"errors"
	"io/fs"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/alephvm/alephvm/execution"
)

// Source is what the collector reads at each scrape.
type Source interface {
	// VMs lists the node's VMs: running, starting, stopping, and the
	// instances it keeps stopped.
	VMs(ctx context.Context) ([]VM, error)
	// Node says what the node holds and can give.
	Node(ctx context.Context) (Node, error)
}

// The states of a VM.
const (
	StateBooting  = "booting"
	StateRunning  = "running"
	StateStopping = "stopping"
	StateStopped  = "stopped"
)

// VM is one VM as the collector reads it.
type VM struct {
	Ref        string
	Type       string // execution.TypeProgram, TypePersistentProgram or TypeInstance
	Hypervisor string
	State      string // StateBooting, StateRunning, StateStopping or StateStopped
	VCPUs      int
	MemoryMiB  int
	// StartedAt is when the VM started; zero when it does not run.
	StartedAt time.Time
	// Pid is the hypervisor's process; 0 when there is none.
	Pid int
	// Tap is the host end of the VM's network, "" when it has none.
	Tap string
	// Disk reads the VM's disk counters from its hypervisor (QEMU's
	// query-blockstats); nil reads its process's I/O counters instead.
	Disk func(ctx context.Context) (DiskIO, error)
}

// DiskIO is what a VM read from and wrote to its disks since it started.
type DiskIO struct {
	ReadBytes, WriteBytes uint64
	ReadOps, WriteOps     uint64
}

// Node is what the node holds and can give.
type Node struct {
	// Memory and vCPUs: what the node may give to VMs, and what its VMs
	// hold.
	MemoryCapacityMiB, MemoryUsedMiB int
	VCPUsCapacity, VCPUsUsed         int
	// Disk is the filesystem of the VMs' volumes, in bytes.
	DiskCapacity, DiskFree int64
	// StoreSize is what the content store's files take, in bytes.
	StoreSize int64
}

// scrapeTimeout bounds what one scrape waits for its sources: the VMs'
// monitors answer in well under a millisecond when they are healthy.
const scrapeTimeout = 5 * time.Second

// readers bounds the VMs read at once.
const readers = 8

// The sources of the scrape errors.
var errorSources = []string{"vms", "node", "process", "disk", "network"}

var (
	vmLabels = []string{"item_hash", "type", "hypervisor"}

	descUp = prometheus.NewDesc("alephvm_vm_up",
		"1 when the VM runs and its hypervisor's process was read, else 0.", vmLabels, nil)
	descUptime = prometheus.NewDesc("alephvm_vm_uptime_seconds",
		"Time since the VM started.", vmLabels, nil)
	descCPU = prometheus.NewDesc("alephvm_vm_cpu_seconds_total",
		"CPU time the VM's hypervisor process used, user and system, its vCPUs' included.", vmLabels, nil)
	descMemUsed = prometheus.NewDesc("alephvm_vm_memory_used_bytes",
		"Resident memory of the VM's hypervisor process: the guest memory it touched, and the hypervisor's own.", vmLabels, nil)
	descMemAssigned = prometheus.NewDesc("alephvm_vm_memory_assigned_bytes",
		"Memory given to the VM.", vmLabels, nil)
	descVCPUs = prometheus.NewDesc("alephvm_vm_vcpus",
		"vCPUs given to the VM.", vmLabels, nil)
	descDiskRead = prometheus.NewDesc("alephvm_vm_disk_read_bytes_total",
		"Bytes the VM read from its disks.", vmLabels, nil)
	descDiskWritten = prometheus.NewDesc("alephvm_vm_disk_written_bytes_total",
		"Bytes the VM wrote to its disks.", vmLabels, nil)
	descDiskReads = prometheus.NewDesc("alephvm_vm_disk_reads_completed_total",
		"Reads the VM made from its disks.", vmLabels, nil)
	descDiskWrites = prometheus.NewDesc("alephvm_vm_disk_writes_completed_total",
		"Writes the VM made to its disks.", vmLabels, nil)
	descNetRxBytes = prometheus.NewDesc("alephvm_vm_network_receive_bytes_total",
		"Bytes the VM received on its network interface (sent to it through its tap).", vmLabels, nil)
	descNetTxBytes = prometheus.NewDesc("alephvm_vm_network_transmit_bytes_total",
		"Bytes the VM sent on its network interface.", vmLabels, nil)
	descNetRxPackets = prometheus.NewDesc("alephvm_vm_network_receive_packets_total",
		"Packets the VM received on its network interface.", vmLabels, nil)
	descNetTxPackets = prometheus.NewDesc("alephvm_vm_network_transmit_packets_total",
		"Packets the VM sent on its network interface.", vmLabels, nil)

	descVMs = prometheus.NewDesc("alephvm_vms",
		"VMs the node knows, by type and state.", []string{"type", "state"}, nil)
	descMemCapacity = prometheus.NewDesc("alephvm_node_memory_capacity_bytes",
		"Memory the node may give to VMs (its memory less what the host keeps).", nil, nil)
	descMemNodeUsed = prometheus.NewDesc("alephvm_node_memory_used_bytes",
		"Memory the node's VMs hold.", nil, nil)
	descMemFree = prometheus.NewDesc("alephvm_node_memory_free_bytes",
		"Memory the node may still give to VMs.", nil, nil)
	descVCPUsCapacity = prometheus.NewDesc("alephvm_node_vcpus_capacity",
		"vCPUs the node may give to VMs (its CPUs times the overcommit factor).", nil, nil)
	descVCPUsUsed = prometheus.NewDesc("alephvm_node_vcpus_used",
		"vCPUs the node's VMs hold.", nil, nil)
	descVCPUsFree = prometheus.NewDesc("alephvm_node_vcpus_free",
		"vCPUs the node may still give to VMs.", nil, nil)
	descDiskCapacity = prometheus.NewDesc("alephvm_node_disk_capacity_bytes",
		"Size of the filesystem of the VMs' volumes.", nil, nil)
	descDiskUsed = prometheus.NewDesc("alephvm_node_disk_used_bytes",
		"Bytes used on the filesystem of the VMs' volumes.", nil, nil)
	descDiskFree = prometheus.NewDesc("alephvm_node_disk_free_bytes",
		"Bytes free on the filesystem of the VMs' volumes.", nil, nil)
	descStoreSize = prometheus.NewDesc("alephvm_store_size_bytes",
		"Bytes the content store's files take.", nil, nil)
	descScrapeErrors = prometheus.NewDesc("alephvm_scrape_errors_total",
		"Reads that failed while the node's metrics were collected, by source.", []string{"source"}, nil)
)

var (
	vmTypes  = []string{execution.TypeProgram, execution.TypePersistentProgram, execution.TypeInstance}
	vmStates = []string{StateBooting, StateRunning, StateStopping, StateStopped}
)

// collector reads the VMs and the node at scrape time.
type collector struct {
	src  Source
	proc string

	mu     sync.Mutex
	errors map[string]uint64
}

func newCollector(src Source, proc string) *collector {
	c := &collector{src: src, proc: proc, errors: map[string]uint64{}}
	for _, s := range errorSources {
		c.errors[s] = 0
	}
	return c
}

func (c *collector) fail(source string) {
	c.mu.Lock()
	c.errors[source]++
	c.mu.Unlock()
}

// Describe implements prometheus.Collector.
func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descUp, descUptime, descCPU, descMemUsed, descMemAssigned, descVCPUs,
		descDiskRead, descDiskWritten, descDiskReads, descDiskWrites, descNetRxBytes, descNetTxBytes, descNetRxPackets,
		descNetTxPackets, descVMs, descMemCapacity, descMemNodeUsed, descMemFree, descVCPUsCapacity, descVCPUsUsed,
		descVCPUsFree, descDiskCapacity, descDiskUsed, descDiskFree, descStoreSize, descScrapeErrors} {
		ch <- d
	}
}

// reading is what was read of one VM.
type reading struct {
	up      bool
	proc    procStat
	disk    DiskIO
	diskOK  bool
	net     netCounters
	netOK   bool
	uptime  time.Duration
	running bool
}

// Collect implements prometheus.Collector.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	if c.src != nil {
		c.collectVMs(ctx, ch)
		c.collectNode(ctx, ch)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range errorSources {
		ch <- prometheus.MustNewConstMetric(descScrapeErrors, prometheus.CounterValue, float64(c.errors[s]), s)
	}
}

func (c *collector) collectVMs(ctx context.Context, ch chan<- prometheus.Metric) {
	vms, err := c.src.VMs(ctx)
	if err != nil {
		c.fail("vms")
	}
	counts := map[[2]string]int{}
	for _, t := range vmTypes {
		for _, s := range vmStates {
			counts[[2]string{t, s}] = 0
		}
	}
	for _, vm := range vms {
		counts[[2]string{vm.Type, vm.State}]++
	}
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(descVMs, prometheus.GaugeValue, float64(n), k[0], k[1])
	}
	if len(vms) == 0 {
		return
	}
	var taps map[string]netCounters
	if hasTap(vms) {
		if taps, err = readNetDev(c.proc); err != nil {
			c.fail("network")
		}
	}
	readings := c.readAll(ctx, vms, taps)
	for i, vm := range vms {
		c.emit(ch, vm, readings[i])
	}
}

func hasTap(vms []VM) bool {
	for _, vm := range vms {
		if vm.Tap != "" && vm.State == StateRunning {
			return true
		}
	}
	return false
}

// readAll reads the running VMs, readers at a time: the monitors' answers
// are waited for together.
func (c *collector) readAll(ctx context.Context, vms []VM, taps map[string]netCounters) []reading {
	out := make([]reading, len(vms))
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(readers, len(vms)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				out[i] = c.read(ctx, vms[i], taps)
			}
		}()
	}
	for i := range vms {
		next <- i
	}
	close(next)
	wg.Wait()
	return out
}

func (c *collector) read(ctx context.Context, vm VM, taps map[string]netCounters) reading {
	var r reading
	if vm.State != StateRunning || vm.Pid <= 0 {
		return r
	}
	r.running = true
	if !vm.StartedAt.IsZero() {
		r.uptime = max(0, time.Since(vm.StartedAt))
	}
	var err error
	if r.proc, err = readProcStat(c.proc, vm.Pid); err != nil {
		// A process gone between the listing and now is a VM that has
		// just stopped, not a failure to read.
		if !errors.Is(err, fs.ErrNotExist) {
			c.fail("process")
		}
		return r
	}
	r.up = true
	if vm.Disk != nil {
		r.disk, err = vm.Disk(ctx)
	} else {
		r.disk, err = readProcIO(c.proc, vm.Pid)
	}
	if err != nil {
		c.fail("disk")
	} else {
		r.diskOK = true
	}
	if vm.Tap != "" && taps != nil {
		r.net, r.netOK = taps[vm.Tap]
	}
	return r
}

func (c *collector) emit(ch chan<- prometheus.Metric, vm VM, r reading) {
	labels := []string{vm.Ref, vm.Type, vm.Hypervisor}
	gauge := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	up := 0.0
	if r.up {
		up = 1
	}
	gauge(descUp, up)
	gauge(descMemAssigned, float64(vm.MemoryMiB)*(1<<20))
	gauge(descVCPUs, float64(vm.VCPUs))
	if !r.running {
		return
	}
	gauge(descUptime, r.uptime.Seconds())
	if !r.up {
		return
	}
	counter(descCPU, r.proc.cpuSeconds)
	gauge(descMemUsed, float64(r.proc.rssBytes))
	if r.diskOK {
		counter(descDiskRead, float64(r.disk.ReadBytes))
		counter(descDiskWritten, float64(r.disk.WriteBytes))
		counter(descDiskReads, float64(r.disk.ReadOps))
		counter(descDiskWrites, float64(r.disk.WriteOps))
	}
	if r.netOK {
		// The tap's receive is what the guest sent, and its transmit
		// what the guest received.
		counter(descNetRxBytes, float64(r.net.txBytes))
		counter(descNetTxBytes, float64(r.net.rxBytes))
		counter(descNetRxPackets, float64(r.net.txPackets))
		counter(descNetTxPackets, float64(r.net.rxPackets))
	}
}

func (c *collector) collectNode(ctx context.Context, ch chan<- prometheus.Metric) {
	n, err := c.src.Node(ctx)
	if err != nil {
		c.fail("node")
		return
	}
	g := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v)
	}
	const mib = 1 << 20
	g(descMemCapacity, float64(n.MemoryCapacityMiB)*mib)
	g(descMemNodeUsed, float64(n.MemoryUsedMiB)*mib)
	g(descMemFree, float64(max(0, n.MemoryCapacityMiB-n.MemoryUsedMiB))*mib)
	g(descVCPUsCapacity, float64(n.VCPUsCapacity))
	g(descVCPUsUsed, float64(n.VCPUsUsed))
	g(descVCPUsFree, float64(max(0, n.VCPUsCapacity-n.VCPUsUsed)))
	g(descDiskCapacity, float64(n.DiskCapacity))
	g(descDiskUsed, float64(max(0, n.DiskCapacity-n.DiskFree)))
	g(descDiskFree, float64(n.DiskFree))
	g(descStoreSize, float64(n.StoreSize))
}
