package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"github.com/alephvm/alephvm/aggregate"
	"github.com/alephvm/alephvm/api"
	"github.com/alephvm/alephvm/assets"
	"github.com/alephvm/alephvm/auth"
	"github.com/alephvm/alephvm/backup"
	"github.com/alephvm/alephvm/baseimage"
	"github.com/alephvm/alephvm/config"
	"github.com/alephvm/alephvm/db"
	"github.com/alephvm/alephvm/diskusage"
	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/guestapi"
	"github.com/alephvm/alephvm/hostcheck"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/hypervisor/firecracker"
	"github.com/alephvm/alephvm/hypervisor/qemu"
	"github.com/alephvm/alephvm/instance"
	"github.com/alephvm/alephvm/internal/backends"
	"github.com/alephvm/alephvm/internal/release"
	"github.com/alephvm/alephvm/internal/sdnotify"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/metrics"
	"github.com/alephvm/alephvm/network"
	"github.com/alephvm/alephvm/pool"
	"github.com/alephvm/alephvm/program"
	"github.com/alephvm/alephvm/reactor"
	"github.com/alephvm/alephvm/snapshot"
	"github.com/alephvm/alephvm/storage"
	"github.com/alephvm/alephvm/store"
)

func newServeCmd(a *app) *cobra.Command {
	var fakeInstance bool
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the node: its HTTP API, its programs and its instances",
		Long: `Run the compute node. It serves the HTTP API on SUPERVISOR_HOST:SUPERVISOR_PORT:
programs at /vm/<item_hash>/ (booted on their first request), the status and
executions routes under /about and /status, the status page at / and metrics at
/metrics, and the scheduler's and operator's routes under /control. Instances
and the persistent programs of the last allocation that were running are taken
back (or restarted) at start. With API_SERVER and WATCH_FOR_MESSAGES it delivers
the messages programs subscribe to.

On SIGTERM or SIGINT it stops accepting requests, lets those in flight finish,
stops the on-demand program VMs and leaves the instances and persistent
programs running for the next start.

It needs root: it creates taps, nftables rules and VMs.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return serve(cmd.Context(), a, fakeInstance, nil)
		},
	}
	cmd.Flags().BoolVar(&fakeInstance, "run-fake-instance", false,
		"developer mode: store FAKE_INSTANCE_MESSAGE over FAKE_INSTANCE_BASE (default: the built base image's UEFI disk) and start it")
	a.bindCommandSettings(cmd)
	return cmd
}

// node is everything serve wires together.
type node struct {
	cfg       config.Config
	log       *slog.Logger
	db        *sql.DB
	store     *store.Store
	records   *execution.Records
	networks  *network.Manager
	programs  *pool.Pool
	instances *instance.Manager
	logs      *program.LogArchive
	plan      hostcheck.Plan
	launcher  *program.Launcher
	// aggregates reads owners' security and port-forwarding aggregates.
	aggregates *aggregate.Client
	admission  *execution.Admission
	// metrics counts what happens and reads the VMs at each scrape
	// (observe.go).
	metrics *metrics.Metrics
	started time.Time
	// diskSpace promises the VMs' disks their space.
	diskSpace *diskusage.Ledger
	// backups makes and restores instances' backups.
	backups *backup.Manager
}

// serve runs the node until ctx ends. started, if given, runs once the API
// listens, with the node and the API's base URL; its error stops the node.
func serve(ctx context.Context, a *app, fakeInstance bool, started func(ctx context.Context, n *node, base string) error) error {
	cfg, log := a.cfg.Config, a.log
	n, cleanup, err := buildNode(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer cleanup()
	if fakeInstance {
		ref, err := startFakeInstance(ctx, n)
		if err != nil {
			return fmt.Errorf("fake instance: %w", err)
		}
		log.Info("fake instance started", "ref", ref)
		fmt.Fprintln(a.stdout, ref)
	}

	authn, err := auth.NewAllocation(auth.AllocationOptions{
		TokenHash: cfg.AllocationTokenHash, Signers: cfg.AllocationSigners, MaxAge: cfg.AllocationMaxAge.Duration(), DB: n.db,
	})
	if err != nil {
		return err
	}
	for _, op := range cfg.OperatorAddresses {
		if err := auth.CheckWalletAddress(op); err != nil {
			return fmt.Errorf("OPERATOR_ADDRESSES: %w", err)
		}
	}
	token, err := loginToken(cfg)
	if err != nil {
		return err
	}
	diag := diagnosticNode(cfg, n.store)
	hostCheck := hostChecker(cfg, diag)
	handler := api.New(api.Options{
		Programs: programsAPI{n.programs, persistentFile(cfg), log}, Instances: instancesAPI{n.instances, allocatedFile(cfg), log}, Auth: authn,
		OwnerAuth: auth.NewOwner(auth.OwnerOptions{Domain: cfg.DomainName, DB: n.db}), Machines: machinesAPI{n}, Grants: n.aggregates,
		Operators: cfg.OperatorAddresses, ProgramVolumes: n.launcher, Storage: storageAPI{cfg: cfg, records: n.records},
		Backups: n.backups, Layers: layersAPI{n.instances, n.store, filepath.Join(cfg.ExecutionRoot, "volumes"), log},
		Logs: logsAPI{n}, Domain: cfg.DomainName, MaxBodyBytes: int64(cfg.MaxRequestBody),
		Limits: api.Limits{
			ReadHeaderTimeout: cfg.HTTPHeaderTimeout.Duration(), ReadTimeout: cfg.HTTPReadTimeout.Duration(), WriteTimeout: cfg.HTTPWriteTimeout.Duration(),
			IdleTimeout: cfg.HTTPIdleTimeout.Duration(), MaxConnections: cfg.HTTPMaxConnections,
		},
		WebsocketOrigins: cfg.WebsocketOrigins, MaxLogFollowers: cfg.LogsMaxFollowers, MaxLogFollowersPerVM: cfg.LogsMaxFollowersVM,
		Observer: n.metrics, Metrics: n.metrics.Handler(), Status: statusSource{metrics: &metricsSource{n}, started: n.started},
		FastAPI: diag, Checks: selfChecks{diag, hostCheck}, HostCheck: hostCheck, Records: recordsAPI{n},
		LoginToken: token, Settings: settingsOf(cfg),
		NodeInfo: nodeInfo{cfg: cfg, volumesDir: filepath.Join(cfg.ExecutionRoot, "volumes"), disks: n.diskSpace, qemu: n.plan.QEMU.Usable},
		Version:  buildVersion(), Log: log,
	})
	addr := net.JoinHostPort(cfg.SupervisorHost, strconv.Itoa(cfg.SupervisorPort))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", addr, err)
	}
	diag.Checker.Node = "http://" + ln.Addr().String()
	srv := handler.HTTPServer()
	served := make(chan error, 1)
	front := handler.Listener(ln)
	go func() { served <- srv.Serve(front) }()
	log.Info("node serving", "addr", ln.Addr().String(), "version", buildVersion())
	// Under systemd (Type=notify) the start ends here: the instances are
	// taken back and the API answers.
	notify := sdnotify.Socket(a.environ)
	if err := sdnotify.Notify(notify, sdnotify.Ready, "STATUS=serving on "+ln.Addr().String()); err != nil {
		log.Warn("tell systemd the node is ready", "err", err)
	}

	restorePersistent(ctx, n.programs, persistentFile(cfg), log)
	reallocate(ctx, n.instances, allocatedFile(cfg), log)
	if cfg.WatchMessages && cfg.APIServer != "" {
		// Until the node stops: its end also ends the reactor.
		r := reactor.New(reactor.Options{APIServer: cfg.APIServer, Deliver: eventsAPI{n.programs}, Log: log.With("part", "reactor")})
		if err := n.store.EachMessage(ctx, message.TypeProgram, func(raw []byte) error { r.Register(raw); return nil }); err != nil {
			log.Warn("the stored programs' subscriptions are not known", "err", err)
		}
		go r.Run(ctx)
	}
	var startErr error
	if started != nil {
		startErr = started(ctx, n, "http://"+ln.Addr().String())
	}
	if startErr == nil {
		select {
		case err := <-served:
			return fmt.Errorf("serve: %w", err)
		case <-ctx.Done():
		}
	}
	log.Info("shutting down: finishing requests in flight")
	_ = sdnotify.Notify(notify, sdnotify.Stopping, "STATUS=finishing requests, stopping programs")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		log.Warn("requests still in flight at shutdown", "err", err)
	}
	if err := front.Wait(shutdownCtx); err != nil {
		log.Warn("program requests still in flight at shutdown", "err", err)
	}
	if err := n.programs.Shutdown(shutdownCtx); err != nil {
		log.Error("stop programs", "err", err)
	}
	n.instances.Shutdown()
	log.Info("node stopped; instances keep running")
	return startErr
}

// buildNode opens the node's state and starts its managers, finding the
// VMs left by an earlier run.
func buildNode(ctx context.Context, cfg config.Config, log *slog.Logger) (*node, func(), error) {
	if os.Geteuid() != 0 {
		return nil, nil, errors.New("the node needs root: it creates taps, nftables rules and VMs")
	}
	limits, err := capacity(cfg, log)
	if err != nil {
		return nil, nil, err
	}
	runDir := filepath.Join(cfg.ExecutionRoot, "vms")
	volumesDir := filepath.Join(cfg.ExecutionRoot, "volumes")
	for _, d := range []string{cfg.ExecutionRoot, cfg.CacheRoot, runDir, volumesDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, nil, err
		}
	}
	database, err := db.Open(ctx, db.Path(cfg.ExecutionRoot), log)
	if err != nil {
		return nil, nil, err
	}
	// What the start-up makes is released in reverse: all of it when a
	// later step fails, by the returned cleanup once the node stops.
	made := &release.List{}
	made.Add("database", func(context.Context) error { return database.Close() })
	cleanup := func() {
		if err := made.Release(context.WithoutCancel(ctx)); err != nil {
			log.Error("release the node's state", "err", err)
		}
	}
	fail := func(err error) (*node, func(), error) {
		cleanup()
		return nil, nil, err
	}
	source := &metricsSource{} // its node is set below
	nodeMetrics := metrics.New(metrics.Options{Source: source, Version: buildVersion()})
	st, err := store.Open(ctx, store.Options{Events: nodeMetrics, Root: cfg.CacheRoot, DB: database, APIServer: cfg.APIServer,
		IPFSGateway: cfg.IPFSGateway, MaxSize: int64(cfg.CacheMaxSize), StallTimeout: cfg.StallTimeout.Duration(), Log: log,
		MaxItemSize: int64(cfg.MaxItemSize), MinFreeSpace: int64(cfg.MinFreeSpace),
		PartMaxAge: cfg.PartMaxAge.Duration(), MessageMaxAge: cfg.MessageMaxAge.Duration()})
	if err != nil {
		return fail(err)
	}
	networks, dns, err := buildNetwork(cfg, log)
	if err != nil {
		return fail(err)
	}
	plan, hvs, qemuDriver, err := buildHypervisors(ctx, cfg, log)
	if err != nil {
		return fail(err)
	}
	if !plan.UEFI.Usable {
		log.Warn("instances of UEFI disk images (debian-12) cannot boot here", "why", plan.UEFI.Why)
	}
	programHV, programErr := plan.ForProgram()
	if programErr != nil {
		log.Warn("programs cannot run on this node", "err", programErr)
	}
	kernel := programKernel(cfg, log)
	base, baseErr := baseimage.Load(baseImageDir(cfg))
	if baseErr != nil {
		log.Warn("no base image built: instances of bare ext4 images cannot boot (alephvm base-image build)", "err", baseErr)
	}
	n := &node{cfg: cfg, log: log, db: database, store: st, records: execution.NewRecords(database), networks: networks,
		logs: program.NewLogArchive(1000), plan: plan, aggregates: aggregate.New(aggregate.Options{APIServer: cfg.APIServer}),
		metrics: nodeMetrics, started: time.Now()}
	source.n = n
	// The output of stopped programs outlives the node.
	if err := n.logs.SaveTo(filepath.Join(cfg.ExecutionRoot, "logs")); err != nil {
		log.Warn("programs' output will not outlive the node", "err", err)
	}
	disks := storage.Disks{Floor: int64(cfg.DiskFreeFloor)}
	guestKey, err := guestapi.LoadKey(filepath.Join(cfg.ExecutionRoot, "guest_api_key"))
	if err != nil {
		return fail(err)
	}
	guestAPI := guestapi.New(guestapi.Options{DB: database, APIServer: cfg.APIServer, Key: guestKey,
		MaxValueSize: int(cfg.GuestCacheMaxValue), MaxKeysPerProgram: cfg.GuestCacheMaxKeys, MaxCacheSize: int64(cfg.GuestCacheMaxSize), Log: log})
	facts := nodeFacts(cfg, log)
	// Every VM's disks are promised before anything is made for it.
	diskSpace := diskusage.NewLedger(volumesDir, diskusage.Space{Reserve: int64(cfg.DiskFreeFloor)})
	n.diskSpace = diskSpace
	templates, templateInputs := programTemplates(ctx, cfg, programHV, qemuDriver, kernel, log)
	if templates != nil {
		made.AddFunc("program templates", templates.Close)
	}
	launcher := program.New(program.Options{
		Store: st, Hypervisor: hvs[programHV], Unavailable: programErr, Networks: networks, Kernel: kernel, Records: n.records,
		RunDir: runDir, VolumesDir: volumesDir, Disks: disks, DiskSpace: diskSpace, DNS: dns, ReadyTimeout: cfg.InitTimeout.Duration(), Logs: n.logs,
		ColdStarts: nodeMetrics, GuestAPI: guestAPI, Node: facts, Log: log,
		Templates: orNilTemplates(templates), TemplateInputs: templateInputs, ProgramSnapshots: cfg.ProgramOwnSnapshots,
	})
	n.launcher = launcher
	// Programs and instances are admitted into one capacity.
	admission := execution.NewAdmission(limits)
	n.admission = admission
	n.programs = pool.New(pool.Options{Launcher: launcher, Admission: admission,
		ReuseTimeout: cfg.ReuseTimeout.Duration(), Log: log})
	n.instances = instance.New(instance.Options{
		Store: st, Hypervisors: hvs, Choose: plan, Networks: networks, Records: n.records,
		DirectBoot: execution.Kernel{Kernel: base.Kernel, Vmlinux: base.Vmlinux, Initrd: base.Initrd, Cmdline: base.Cmdline},
		UEFICode:   cfg.UEFICode, UEFIVars: cfg.UEFIVars, UnpackDir: unpackDir(cfg), LayerMaxDepth: cfg.LayerMaxDepth,
		VolumesDir: volumesDir, RunDir: runDir, Disks: disks, DiskSpace: diskSpace, DNS: dns, DeveloperKeys: cfg.DeveloperSSHKeys,
		MaxPublishedPorts: cfg.MaxPublishedPorts, Ports: n.aggregates, Admission: admission, ColdStarts: nodeMetrics, Node: facts, Log: log,
	})
	backupKey, err := backup.LoadSecret(filepath.Join(cfg.ExecutionRoot, "backup_url_key"))
	if err != nil {
		return fail(err)
	}
	n.backups, err = backup.New(backup.Options{Dir: cfg.Backups(), Keep: cfg.BackupsPerVM, MaxAge: cfg.BackupMaxAge.Duration(),
		Compression: cfg.BackupCompression, MaxUpload: int64(cfg.MaxRestoreUpload), Secret: backupKey, Domain: cfg.DomainName, Space: diskSpace,
		Instances: n.instances, Store: st, Log: log})
	if err != nil {
		return fail(err)
	}

	// Programs do not outlive the node, but persistent ones: any other
	// left by a crash is stopped; the persistent programs of the last
	// allocation are taken back.
	// Nothing makes disks yet: what a killed node was making is garbage.
	leftovers, err := storage.RemoveLeftovers(volumesDir)
	if err != nil {
		log.Error("remove what an earlier run left half made", "err", err)
	}
	if len(leftovers) > 0 {
		log.Info("removed what an earlier run left half made", "files", leftovers)
	}
	if gone, err := storage.CollectUnpacked(unpackDir(cfg), time.Now().Add(-24*time.Hour)); err != nil || len(gone) > 0 {
		log.Info("unpacked base images no instance uses removed", "files", gone, "err", err)
	}
	kept := readPersistent(persistentFile(cfg), log)
	if err := launcher.StopOrphans(ctx, hvs, kept); err != nil {
		log.Error("stop programs left by an earlier run", "err", err)
	}
	// The table the earlier node left holds the VMs still running: it is
	// replaced once every one of them is taken back, in one write that
	// holds them all (ADR 0004), then the instances that died meanwhile
	// start again, each written as it attaches.
	networks.DeferWrites()
	gone, err := n.instances.Adopt(ctx)
	if err != nil {
		log.Error("find instances again", "err", err)
	}
	adoptPersistent(ctx, n, launcher, hvs, kept)
	if err := networks.RemoveOrphanTaps(); err != nil {
		log.Error("remove orphan taps", "err", err)
	}
	if err := networks.Apply(); err != nil {
		return fail(err)
	}
	if err := n.instances.Restart(ctx, gone); err != nil {
		log.Error("start instances again", "err", err)
	}
	sweep, stopSweep := context.WithCancel(ctx) // ends before the database closes
	go st.Sweep(sweep, store.SweepInterval)
	go guestAPI.Sweep(sweep, 10*time.Minute)
	made.AddFunc("store sweep", stopSweep)
	return n, cleanup, nil
}

// buildHypervisors probes the host, decides which backends run here
// (as alephvm doctor says) and starts their drivers.
func buildHypervisors(ctx context.Context, cfg config.Config, log *slog.Logger) (hostcheck.Plan, execution.Hypervisors, *qemu.Driver, error) {
	host := hostcheck.ProbeHost(ctx, hostPaths(cfg))
	plan := hostcheck.Decide(host, doctorSettings(cfg))
	hvs := execution.Hypervisors{}
	var qemuDriver *qemu.Driver
	if plan.QEMU.Usable {
		driver, err := qemu.New(ctx, qemu.Options{Accel: cfg.QEMUAccel, RunAs: cfg.QEMURunAs, FirstUID: cfg.QEMUFirstUID, ConsoleMaxSize: int64(cfg.ConsoleLogMaxSize)}, log)
		if err != nil {
			return plan, nil, nil, err
		}
		hvs[hypervisor.QEMU] = backends.QEMUBackend(driver)
		qemuDriver = driver
	}
	if plan.Firecracker.Usable {
		driver, err := firecracker.New(firecracker.Options{
			Firecracker: cfg.FirecrackerPath, Jailer: cfg.JailerPath, UseJailer: cfg.UseJailer,
			JailerBase: cfg.JailerBase(), FirstUID: cfg.JailerFirstUID, ConsoleMaxSize: int64(cfg.ConsoleLogMaxSize),
		}, log)
		if err != nil {
			return plan, nil, nil, err
		}
		hvs[hypervisor.Firecracker] = backends.FirecrackerBackend(driver)
	}
	log.Info("hypervisors", "qemu", plan.QEMU.Why, "firecracker", plan.Firecracker.Why,
		"programs", plan.Programs.Hypervisor, "instances_default", plan.Instances.Hypervisor, "firecracker_disks", plan.RawDisks)
	return plan, hvs, qemuDriver, nil
}

// programTemplates starts the manager of the snapshots programs restore
// from, when PROGRAM_SNAPSHOTS is on and programs run under QEMU; it
// returns nil, and logs why, when they do not.
func programTemplates(ctx context.Context, cfg config.Config, programHV string, driver *qemu.Driver, kernel execution.Kernel, log *slog.Logger) (*snapshot.Manager, snapshot.Inputs) {
	in := snapshot.Inputs{Machine: qemu.MachineRevision}
	switch {
	case !cfg.ProgramSnapshots:
		log.Info("program snapshots are off (PROGRAM_SNAPSHOTS): programs boot")
		return nil, in
	case programHV != hypervisor.QEMU || driver == nil:
		log.Info("program snapshots are QEMU's only: programs boot", "hypervisor", programHV)
		return nil, in
	case kernel.Kernel == "" || kernel.Initrd == "":
		return nil, in
	}
	var err error
	for _, f := range []struct {
		path string
		sum  *string
	}{{driver.Binary(), &in.Hypervisor}, {kernel.Kernel, &in.Kernel}, {kernel.Initrd, &in.Initrd}} {
		if *f.sum, err = snapshot.FileSHA256(f.path); err != nil {
			log.Warn("program snapshots off: programs boot", "err", err)
			return nil, in
		}
	}
	m, err := snapshot.NewManager(ctx, snapshot.Options{Dir: filepath.Join(cfg.CacheRoot, "templates"),
		Hypervisor: backends.QEMUTemplates(driver), Log: log.With("part", "templates")})
	if err != nil {
		log.Warn("program snapshots off: programs boot", "err", err)
		return nil, in
	}
	// Templates of another kernel, initramfs, QEMU or machine cannot be
	// used again.
	current := in
	if n := m.Sweep(func(t snapshot.Inputs) bool {
		return t.Hypervisor == current.Hypervisor && t.Machine == current.Machine && t.Kernel == current.Kernel && t.Initrd == current.Initrd
	}); n > 0 {
		log.Info("old program templates removed", "count", n)
	}
	return m, in
}

// orNilTemplates keeps a nil manager from becoming a non-nil interface.
func orNilTemplates(m *snapshot.Manager) program.Templates {
	if m == nil {
		return nil
	}
	return m
}

func buildNetwork(cfg config.Config, log *slog.Logger) (*network.Manager, []netip.Addr, error) {
	poolPrefix, err := netip.ParsePrefix(cfg.IPv4AddressPool)
	if err != nil {
		return nil, nil, err
	}
	netPool, err := network.NewPool(poolPrefix, cfg.IPv4PrefixLength, 4)
	if err != nil {
		return nil, nil, err
	}
	uplink := cfg.NetworkInterface
	if uplink == "" {
		if uplink, err = network.Uplink(); err != nil {
			log.Warn("no uplink: VMs will reach nothing beyond the node", "err", err)
		}
	}
	if err := network.EnableForwarding(); err != nil {
		return nil, nil, err
	}
	var dns []netip.Addr
	for _, s := range cfg.DNSNameservers {
		dns = append(dns, netip.MustParseAddr(s)) // checked by config.Validate
	}
	if len(dns) == 0 {
		if dns, err = network.HostResolvers(); err != nil {
			log.Warn("guests get no DNS server", "err", err)
		}
	}
	allowed, err := cfg.GuestAllowedPrefixes()
	if err != nil {
		return nil, nil, err
	}
	fw := network.NewFirewall(uplink, poolPrefix)
	if err := fw.SetEgress(network.Egress{Allowed: allowed, DNS: dns}); err != nil {
		return nil, nil, err
	}
	m := network.NewManager(netPool, fw, network.DefaultPorts, log)
	var pool6 netip.Prefix
	if cfg.IPv6AddressPool != "" {
		pool6 = netip.MustParsePrefix(cfg.IPv6AddressPool) // checked by config.Validate
		if err := network.EnableIPv6Forwarding(uplink, cfg.UseNDPProxy); err != nil {
			return nil, nil, err
		}
		m.SetIPv6(network.IPv6Config{Pool: pool6, NDPProxy: cfg.UseNDPProxy, Uplink: uplink})
	}
	log.Info("network", "uplink", uplink, "pool", poolPrefix, "ipv6_pool", pool6, "ndp_proxy", cfg.UseNDPProxy, "dns", dns, "guest_allowed_networks", allowed)
	return m, dns, nil
}

// capacity is what the node may give to VMs: its memory less what
// the host keeps, and its CPUs times the overcommit factor.
func capacity(cfg config.Config, log *slog.Logger) (pool.Capacity, error) {
	total, err := pool.MemTotalMiB()
	if err != nil {
		log.Warn("memory of the host unknown: no memory admission control", "err", err)
	}
	c, err := pool.HostCapacity(total, cfg.HostMemoryReserved, runtime.NumCPU(), cfg.VCPUOvercommit)
	if err != nil {
		return c, fmt.Errorf("capacity for VMs (HOST_MEMORY_RESERVED_MIB, VCPU_OVERCOMMIT_FACTOR): %w", err)
	}
	log.Info("capacity for VMs", "memory_mib", c.MemoryMiB, "vcpus", c.VCPUs)
	return c, nil
}

// baseImageDir is where the default base image is built.
// unpackDir keeps the unpacked copies of compressed base images.
func unpackDir(cfg config.Config) string { return filepath.Join(cfg.CacheRoot, "unpacked") }

func baseImageDir(cfg config.Config) string { return filepath.Join(cfg.CacheRoot, "base-image") }

// programKernel is what program VMs boot: the kernel and initramfs named
// by LINUX_PATH, LINUX_VMLINUX_PATH and INITRD_PATH, else those alephvm
// assets build made. Without them the node serves no program, and says why.
func programKernel(cfg config.Config, log *slog.Logger) execution.Kernel {
	k, err := assets.FindProgramKernel(cfg.Assets(), assets.ProgramKernel{BzImage: cfg.ProgramKernel, Vmlinux: cfg.ProgramVmlinux, Initrd: cfg.ProgramInitrd})
	if err != nil {
		log.Warn("guest kernel or initramfs missing: programs cannot run on this node (alephvm assets build, or LINUX_PATH, LINUX_VMLINUX_PATH and INITRD_PATH)", "err", err)
	}
	return execution.Kernel{Kernel: k.BzImage, Vmlinux: k.Vmlinux, Initrd: k.Initrd, Cmdline: guest.KernelCmdline}
}

// startFakeInstance is the reference's developer mode: a local base image
// and a local INSTANCE message, whose rootfs parent is made the image's
// ref (message.WithRootfsParent), are stored and the instance started.
func startFakeInstance(ctx context.Context, n *node) (message.ItemHash, error) {
	base := n.cfg.FakeInstanceBase
	if base == "" {
		img, err := baseimage.Load(baseImageDir(n.cfg))
		if err != nil {
			return "", fmt.Errorf("no FAKE_INSTANCE_BASE and no built base image (alephvm base-image build): %w", err)
		}
		base = img.Disk
	}
	if n.cfg.FakeInstanceMessage == "" {
		return "", errors.New("FAKE_INSTANCE_MESSAGE is not set")
	}
	added, err := n.store.AddFile(ctx, base)
	if err != nil {
		return "", err
	}
	raw, err := os.ReadFile(n.cfg.FakeInstanceMessage)
	if err != nil {
		return "", err
	}
	if raw, _, err = message.WithRootfsParent(raw, message.ParentVolume{Ref: added.Ref}); err != nil {
		return "", fmt.Errorf("%s: %w", n.cfg.FakeInstanceMessage, err)
	}
	msg, err := n.store.AddMessage(ctx, raw)
	if err != nil {
		return "", err
	}
	return msg.ItemHash, n.instances.Start(ctx, msg.ItemHash)
}

// allocatedFile is where the instances of the last allocation are written.
func allocatedFile(cfg config.Config) string {
	return filepath.Join(cfg.ExecutionRoot, "allocated_instances.json")
}

// persistentFile is where the persistent programs of the last allocation
// are written.
func persistentFile(cfg config.Config) string {
	return filepath.Join(cfg.ExecutionRoot, "persistent_vms.json")
}
