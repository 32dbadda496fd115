//! Puts the configured virtio devices on virtio-mmio: a window in the MMIO hole, an IRQ, an
//! irqfd, one ioeventfd per queue, and a `virtio_mmio.device=` entry on the command line.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::{Address, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use arch::GuestMemory;
use arch::layout::{
    MMIO_HOLE_END, PCI_BAR_START, PCI_BAR_STRIDE, PMEM_WINDOW_START, VIRTIO_FIRST_IRQ, VIRTIO_MMIO_START,
    VIRTIO_MMIO_WINDOW,
};
use devices::Bus;
use devices::pci::PciRoot;
use virtio::VirtioDevice;
use virtio::blk::Block;
use virtio::console::{Console, ConsoleIo};
use virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use virtio::pci::PciTransport;
use virtio::rate_limiter::RateLimit;
use virtio::rng::Rng;

use crate::config::{ConsoleConfig, NetAttachment, VirtioTransport, VmConfig};
use crate::error::Error;
use crate::gsi::{FIRST_MSI_GSI, GsiRouter};

/// What the VMM keeps of the devices it attached, to control them later.
#[derive(Default)]
pub struct AttachedDevices {
    pub balloon: Option<Arc<virtio::balloon::BalloonControl>>,
    /// The virtio-mmio transports in slot order, for snapshots.
    pub mmio: Vec<Arc<Mutex<MmioTransport>>>,
    /// The virtio-pci functions in slot order and their root, for snapshots.
    pub pci: Vec<Arc<Mutex<PciTransport>>>,
    pub pci_root: Option<Arc<Mutex<PciRoot>>>,
    /// Each disk's ID and how to change it while the VM runs.
    pub disks: Vec<(String, DeviceUpdater)>,
    /// How to change each network interface while the VM runs, in configuration order.
    pub nets: Vec<DeviceUpdater>,
    /// Each pmem device's ID and how to change it while the VM runs.
    pub pmem: Vec<(String, DeviceUpdater)>,
    pub memory_hotplug: Option<(Arc<virtio::mem::MemControl>, Arc<crate::hotplug::PluggableMemory>)>,
    /// Assigned PCI devices (VFIO, vfio-user).
    pub passthrough: crate::passthrough::AttachedPassthrough,
    /// Each network interface's ID and firewall, in configuration order.
    pub firewalls: Vec<(String, Arc<net::firewall::Firewall>)>,
    /// What announces each interface's guest on its port after a migration.
    pub announcers: Vec<virtio::net::Announcer>,
    /// The kernel's copy of managed-network ports' firewalls, by interface ID and TAP; they go
    /// with the VMM.
    pub port_rules: Vec<(String, String, Mutex<net::port_rules::PortRules>)>,
}

impl AttachedDevices {
    /// Gives KVM the plugged blocks of hotpluggable memory and the sink the unplugged ones,
    /// once the virtio-mem device has its state (new, or restored from a snapshot).
    pub fn sync_hotplug(&self) -> Result<(), Error> {
        match &self.memory_hotplug {
            Some((control, blocks)) => {
                blocks.sync(&control.plugged_blocks()).map_err(|e| Error::Device(format!("virtio-mem: {e}")))
            }
            None => Ok(()),
        }
    }
}

/// A change to a running device: a disk's image or rate limit, a network interface's rate
/// limits (None: that direction stays as it is).
pub enum DeviceChange<'a> {
    Backing(&'a std::path::Path),
    RateLimit(Option<RateLimit>),
    NetRateLimits { rx: Option<Option<RateLimit>>, tx: Option<Option<RateLimit>> },
}

/// Applies a [`DeviceChange`] to one device.
pub type DeviceUpdater = Box<dyn Fn(DeviceChange) -> Result<(), String> + Send>;

fn apply(state: &mut virtio::transport::VirtioState, change: DeviceChange) -> Result<(), String> {
    state.update_device(|d| match change {
        DeviceChange::Backing(path) => d.update_backing(path),
        DeviceChange::RateLimit(limit) => d.update_rate_limit(limit),
        DeviceChange::NetRateLimits { rx, tx } => d.update_rate_limits(rx, tx),
    })
}

/// Creates every virtio device of `config` and attaches it with the configured transport.
pub fn attach_all(
    vm: &Arc<VmFd>,
    mem: &GuestMemory,
    config: &VmConfig,
    pio: &mut Bus,
    mmio: &mut Bus,
    cmdline: &mut Cmdline,
) -> Result<AttachedDevices, Error> {
    let mut attached = AttachedDevices::default();
    let mut devices: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let name = format!("virtio-blk{i}");
        if let Some(options) = &disk.vhost_user {
            let device = vhost_user_device(&name, vhost_user::Kind::Block, options)?;
            devices.push((name, Box::new(device)));
            continue;
        }
        let block = Block::open_cached(&disk.path, disk.readonly, &disk.id, disk.cache)
            .map_err(|e| Error::Device(e.to_string()))?
            .with_engine(disk.io_engine)
            .with_rate_limit(disk.rate_limit)
            .with_polling(disk.poll_us.unwrap_or(crate::config::DEFAULT_POLL_US));
        devices.push((name, Box::new(block)));
    }
    if config.nets.iter().any(|n| matches!(n.attachment, NetAttachment::Tap(_) | NetAttachment::Network { .. })) {
        // vhost-net would move the TAP's datapath into the kernel; the user-space one serves.
        match std::path::Path::new("/dev/vhost-net").exists() {
            true => {
                tracing::info!("/dev/vhost-net exists, but virtio-net runs in its own worker (vhost-net is not used)")
            }
            false => tracing::info!("no /dev/vhost-net on this host: virtio-net runs in its own worker"),
        }
    }
    for (i, nic) in config.nets.iter().enumerate() {
        let mac = nic.mac.unwrap_or_else(|| default_mac(config.id.as_deref(), i));
        let id = nic.api_id(i);
        let pairs = usize::from(nic.queue_pairs(config.cpus));
        let hosts = match &nic.attachment {
            NetAttachment::Tap(name) => tap_hosts(name, pairs)?,
            NetAttachment::Network { name, isolated } => {
                let network = net::network::load(name).map_err(Error::Device)?;
                // Unique per VMM and interface; the kernel removes it when the VMM exits,
                // however it exits, since the VMM does not make it persistent.
                let tap_name = format!("fv{}n{i}", std::process::id());
                let taps = tap_hosts(&tap_name, pairs)?;
                // The kernel's rules go on before the port joins the bridge, so that nothing
                // reaches the VM unfiltered in between.
                let kernel = kernel_rules(nic, mac, &tap_name).map_err(|e| {
                    Error::Device(format!("virtio-net{i}: the port's kernel rules cannot be set ({e})"))
                })?;
                attached.port_rules.push((id.clone(), tap_name.clone(), Mutex::new(kernel)));
                net::network::attach(&network, &tap_name, *isolated)
                    .map_err(|e| Error::Device(format!("cannot attach {tap_name} to network {name}: {e}")))?;
                tracing::info!("virtio-net{i}: {tap_name} on network {name} (bridge {})", network.bridge);
                taps
            }
            NetAttachment::User { forwards } => {
                let port = net::usernet::spawn(forwards).map_err(|e| {
                    Error::Device(format!("the user network cannot start ({e}); is a forwarded host port in use?"))
                })?;
                tracing::info!("virtio-net{i}: user network, guest 10.0.2.15, router 10.0.2.2 (the host's loopback)");
                vec![virtio::net::NetHost::Switch(port)]
            }
            NetAttachment::VhostUser(options) => {
                // The back-end moves the frames: no host port, no firewall in the VMM.
                let name = format!("virtio-net{i}");
                let device = vhost_user_device(&name, vhost_user::Kind::Net { mac }, options)?;
                devices.push((name, Box::new(device)));
                continue;
            }
            NetAttachment::Switch { path, vlan } => vec![switch_host(path, *vlan)?],
        };
        let firewall = port_firewall(nic, mac).map_err(|e| Error::Device(format!("virtio-net{i}: {e}")))?;
        attached.firewalls.push((id, firewall.clone()));
        let net = virtio::net::Net::with_queue_pairs(hosts, mac)
            .with_firewall(Some(firewall))
            .with_rate_limits(nic.rx_rate_limit, nic.tx_rate_limit)
            .with_mmds(nic.mmds)
            .with_mtu(nic.mtu)
            .with_polling(nic.poll_us.unwrap_or(crate::config::DEFAULT_POLL_US));
        match net.announcer() {
            Ok(announcer) => attached.announcers.push(announcer),
            Err(e) => tracing::warn!("virtio-net{i}: the guest cannot be announced after a migration ({e})"),
        }
        devices.push((format!("virtio-net{i}"), Box::new(net)));
    }
    let ram_end = vm_memory::GuestMemoryBackend::last_addr(mem).raw_value() + 1;
    let mut window = PMEM_WINDOW_START;
    let mut high = ram_end.max(MMIO_HOLE_END).next_multiple_of(1 << 30);
    for (i, p) in config.pmem.iter().enumerate() {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!p.readonly)
            .open(&p.path)
            .map_err(|source| Error::Open { what: "virtio-pmem file", path: p.path.display().to_string(), source })?;
        let mapping = virtio::pmem::PmemMapping::new(file, p.readonly)
            .map_err(|e| Error::Device(format!("virtio-pmem file {} {e}", p.path.display())))?;
        let gpa = if window + mapping.len <= VIRTIO_MMIO_START {
            window += mapping.len;
            window - mapping.len
        } else {
            high += mapping.len.next_multiple_of(1 << 30);
            high - mapping.len.next_multiple_of(1 << 30)
        };
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: (vm_memory::GuestMemoryBackend::num_regions(mem) + i) as u32,
            flags: if p.readonly { kvm_bindings::KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: gpa,
            memory_size: mapping.len,
            userspace_addr: mapping.host_addr,
        };
        // SAFETY: the host range is the file's live mapping, which the device holds (its
        // transport is in `attached`) for as long as the VM exists.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| Error::Device(format!("virtio-pmem: KVM refused the memory slot ({e})")))?;
        tracing::info!("virtio-pmem{i}: {} at {gpa:#x} ({} MiB)", p.path.display(), mapping.len >> 20);
        let pmem = virtio::pmem::Pmem::new(Arc::new(mapping), gpa).with_rate_limit(p.rate_limit);
        devices.push((format!("virtio-pmem{i}"), Box::new(pmem)));
    }
    for (i, fs) in config.fs.iter().enumerate() {
        let name = format!("virtio-fs{i}");
        let device = vhost_user_device(&name, vhost_user::Kind::Fs { tag: fs.tag.clone() }, &fs.vhost_user)?;
        devices.push((name, Box::new(device)));
    }
    if let (Some(hotplug), Some((addr, size))) = (config.memory_hotplug, config.hotplug_region()) {
        let region = virtio::mem::MemRegion { addr, size, block_size: hotplug.block_mib << 20 };
        let err = |e: String| Error::Device(format!("virtio-mem: {e}"));
        let blocks = Arc::new(
            crate::hotplug::PluggableMemory::new(vm.clone(), mem, region, config.memory, config.track_dirty_pages)
                .map_err(err)?,
        );
        let device = virtio::mem::Mem::new(region, hotplug.requested_mib << 20, blocks.clone()).map_err(err)?;
        // Only unplugged blocks have no KVM slot, so only they reach the bus.
        let guard: devices::SharedDevice = Arc::new(Mutex::new(device.control().guard()));
        mmio.insert(addr, size, guard).map_err(|e| err(e.to_string()))?;
        tracing::info!("virtio-mem: {} MiB of hotpluggable memory at {addr:#x}", size >> 20);
        attached.memory_hotplug = Some((device.control(), blocks));
        devices.push(("virtio-mem".into(), Box::new(device)));
    }
    if let Some(vsock) = &config.vsock {
        let device = virtio::vsock::Vsock::new(vsock.cid, &vsock.uds)
            .map_err(|e| Error::Device(format!("virtio-vsock: {e}")))?;
        tracing::info!("virtio-vsock: guest CID {}, host connections through {}", vsock.cid, vsock.uds.display());
        devices.push(("virtio-vsock".into(), Box::new(device)));
    }
    if let Some(options) = config.balloon {
        let balloon =
            virtio::balloon::Balloon::new(options).map_err(|e| Error::Device(format!("virtio-balloon: {e}")))?;
        attached.balloon = Some(balloon.control());
        devices.push(("virtio-balloon".into(), Box::new(balloon)));
    }
    if config.rng {
        devices.push(("virtio-rng".into(), Box::new(Rng::new().with_rate_limit(config.rng_rate_limit))));
    }
    if let Some(console) = &config.console {
        let io = match console {
            ConsoleConfig::Stdio => ConsoleIo::stdio(),
            ConsoleConfig::File(path) => ConsoleIo::file(path, config.output_limit),
            ConsoleConfig::Pty => ConsoleIo::pty(),
        }
        .map_err(|e| Error::Device(format!("virtio-console: {e}")))?;
        tracing::info!("virtio-console on {}", io.description);
        devices.push(("virtio-console".into(), Box::new(Console::new(io))));
    }
    for (name, device) in &devices {
        if let Some(metrics) = device.metrics() {
            virtio::metrics::register(name, device_kind(device.device_type()), metrics);
        }
    }
    // One PCI root and one routing table for virtio-pci functions and assigned devices.
    let mut root = PciRoot::new();
    let router = Arc::new(GsiRouter::new(vm.clone()));
    let virtio_count = devices.len();
    // MSI vectors, virtio-pci's then assigned devices', take the GSIs above the IOAPIC's pins.
    let mut next_gsi = FIRST_MSI_GSI;
    // Devices were added disks first, then network interfaces, then pmem devices: their
    // transports come in the same order.
    let updaters: Vec<DeviceUpdater> = match config.transport {
        VirtioTransport::Mmio => {
            attached.mmio = attach_mmio(vm, mem, devices, mmio, cmdline)?;
            let updater = |t: Arc<Mutex<MmioTransport>>| -> DeviceUpdater {
                Box::new(move |change| apply(t.lock().unwrap_or_else(|p| p.into_inner()).virtio_state(), change))
            };
            attached.mmio.iter().cloned().map(updater).collect()
        }
        VirtioTransport::Pci => {
            let transports = attach_pci(vm, mem, devices, &mut root, router.clone(), mmio, &mut next_gsi)?;
            attached.pci = transports.clone();
            let updater = |t: Arc<Mutex<PciTransport>>| -> DeviceUpdater {
                Box::new(move |change| apply(t.lock().unwrap_or_else(|p| p.into_inner()).virtio_state(), change))
            };
            transports.into_iter().map(updater).collect()
        }
    };
    if !config.passthrough.is_empty() {
        let bases = crate::passthrough::Bases {
            first_gsi: next_gsi,
            first_slot: (vm_memory::GuestMemoryBackend::num_regions(mem) + config.pmem.len()) as u32,
            lowest_line: match config.transport {
                VirtioTransport::Mmio => VIRTIO_FIRST_IRQ as u8 + virtio_count as u8,
                VirtioTransport::Pci => VIRTIO_FIRST_IRQ as u8,
            },
        };
        attached.passthrough = crate::passthrough::attach(vm, mem, config, mmio, &mut root, router, bases)?;
    }
    if config.transport == VirtioTransport::Pci || !config.passthrough.is_empty() {
        let root = Arc::new(Mutex::new(root));
        pio.insert(u64::from(devices::pci::CONFIG_PORT), devices::pci::CONFIG_PORT_LEN, root.clone())
            .map_err(|e| Error::Device(format!("PCI root: {e}")))?;
        attached.pci_root = Some(root);
    }
    let mut updaters = updaters.into_iter();
    attached.disks = config.disks.iter().map(|d| d.id.clone()).zip(updaters.by_ref()).collect();
    attached.nets = updaters.by_ref().take(config.nets.len()).collect();
    attached.pmem = config.pmem.iter().enumerate().map(|(i, p)| p.api_id(i)).zip(updaters).collect();
    Ok(attached)
}

/// The virtio-net device of interface `nic` (a TAP or a switch port, one queue pair) with its
/// firewall, for `ferrovisor vhost-user-net`, which serves it to another process's driver.
pub fn backend_net(nic: &crate::config::NetConfig) -> Result<virtio::net::Net, Error> {
    let mac = nic.mac.unwrap_or_else(|| default_mac(None, 0));
    let hosts = match &nic.attachment {
        NetAttachment::Tap(name) => tap_hosts(name, 1)?,
        NetAttachment::Switch { path, vlan } => vec![switch_host(path, *vlan)?],
        _ => {
            return Err(Error::Device(
                "a vhost-user-net back-end serves a TAP (--tap) or a switch port (--switch)".into(),
            ));
        }
    };
    let firewall = port_firewall(nic, mac).map_err(Error::Device)?;
    Ok(virtio::net::Net::with_queue_pairs(hosts, mac)
        .with_firewall(Some(firewall))
        .with_polling(nic.poll_us.unwrap_or(crate::config::DEFAULT_POLL_US)))
}

/// Up to `pairs` queues of TAP `name` as an interface's host side.
fn tap_hosts(name: &str, pairs: usize) -> Result<Vec<virtio::net::NetHost>, Error> {
    let taps = net::Tap::open_queues(name, virtio::net::VNET_HDR_LEN as i32, pairs)
        .map_err(|e| Error::Device(e.to_string()))?;
    Ok(taps.into_iter().map(virtio::net::NetHost::Tap).collect())
}

/// A port on the switch at `path`, in `vlan`, as an interface's host side.
fn switch_host(path: &std::path::Path, vlan: u16) -> Result<virtio::net::NetHost, Error> {
    let port = net::switch::SwitchPort::connect(path, vlan).map_err(|e| {
        Error::Device(format!(
            "cannot plug into the switch at {} ({e}); is `ferrovisor switch {}` running?",
            path.display(),
            path.display()
        ))
    })?;
    Ok(virtio::net::NetHost::Switch(port))
}

/// Connects a device that the vhost-user back-end of `options` serves.
fn vhost_user_device(
    name: &str,
    kind: vhost_user::Kind,
    options: &crate::config::VhostUserOptions,
) -> Result<vhost_user::VhostUserDevice, Error> {
    let what = kind.name();
    vhost_user::VhostUserDevice::connect(
        name,
        kind,
        options.socket.clone(),
        usize::from(options.num_queues),
        options.queue_size,
    )
    .map_err(|e| Error::Device(format!("{name} ({what} at {}): {e}", options.socket.display())))
}

/// The firewall of interface `nic` (MAC `mac`): its rules, or none; anti-spoofing and storm
/// control by default on the switch and managed networks, where VMs share a segment.
fn port_firewall(nic: &crate::config::NetConfig, mac: [u8; 6]) -> Result<Arc<net::firewall::Firewall>, String> {
    use net::firewall::{Firewall, PortIdentity};
    let shared_segment = matches!(nic.attachment, NetAttachment::Switch { .. } | NetAttachment::Network { .. });
    let identity = PortIdentity { mac, ip: nic.ip, ip6: nic.ip6, anti_spoofing: shared_segment };
    let spec = match (&nic.firewall, shared_segment) {
        (Some(spec), _) => spec.clone(),
        (None, true) => guards_only(),
        (None, false) => return Ok(Arc::new(Firewall::inactive(identity))),
    };
    Ok(Arc::new(Firewall::new(spec.check()?, identity)))
}

/// The kernel's copy of a managed-network port's firewall, on `tap`: its rules (or guards only),
/// anti-spoofing on unless they say otherwise, as on the VMM's side.
fn kernel_rules(nic: &crate::config::NetConfig, mac: [u8; 6], tap: &str) -> Result<net::port_rules::PortRules, String> {
    let rules = nic.firewall.clone().unwrap_or_else(guards_only).check()?;
    let guards = net::port_rules::Guards {
        mac,
        ip: nic.ip,
        anti_spoofing: rules.anti_spoofing.unwrap_or(true),
        storm_pps: rules.storm_pps(),
    };
    net::port_rules::PortRules::install(tap, &guards, &rules)
}

/// The rules of a port given none where guards are on by default: all traffic allowed.
fn guards_only() -> net::firewall::RuleSetSpec {
    use net::firewall::{Action, RuleSetSpec};
    RuleSetSpec { default_in: Action::Allow, default_out: Action::Allow, ..Default::default() }
}

/// A locally administered unicast MAC for interface `index`: derived from the VM's id when it
/// has one, so that a relaunched VM keeps its address (and its DHCP lease), else from the
/// process ID, so that VMs on one bridge never share an address.
fn default_mac(id: Option<&str>, index: usize) -> [u8; 6] {
    let tag = match id {
        Some(id) => {
            let hash =
                id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
            (hash ^ (hash >> 32)) as u32
        }
        None => std::process::id(),
    }
    .to_be_bytes();
    [0x02, 0xfe, tag[1], tag[2], tag[3], index as u8 + 1]
}

/// The name metrics use for a device type, as Firecracker's metrics do.
fn device_kind(device_type: u32) -> &'static str {
    match device_type {
        virtio::TYPE_BLOCK => "block",
        virtio::TYPE_NET => "net",
        virtio::TYPE_RNG => "entropy",
        virtio::TYPE_BALLOON => "balloon",
        virtio::TYPE_VSOCK => "vsock",
        virtio::TYPE_CONSOLE => "console",
        virtio::TYPE_PMEM => "pmem",
        virtio::TYPE_MEM => "memory_hotplug",
        _ => "other",
    }
}

fn device_err(name: &str) -> impl Fn(String) -> Error + '_ {
    move |e| Error::Device(format!("{name}: {e}"))
}

/// virtio-mmio: a window and an IOAPIC pin each, announced with `virtio_mmio.device=`.
fn attach_mmio(
    vm: &VmFd,
    mem: &GuestMemory,
    devices: Vec<(String, Box<dyn VirtioDevice>)>,
    mmio: &mut Bus,
    cmdline: &mut Cmdline,
) -> Result<Vec<Arc<Mutex<MmioTransport>>>, Error> {
    let mut transports = Vec::new();
    for (slot, (name, device)) in devices.into_iter().enumerate() {
        let base = VIRTIO_MMIO_START + slot as u64 * VIRTIO_MMIO_WINDOW;
        let irq = VIRTIO_FIRST_IRQ + slot as u32;
        let irqfd =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| Error::Device(format!("{name}: {e}")))?;
        vm.register_irqfd(&irqfd, irq).map_err(|e| Error::Device(format!("{name}: routing IRQ {irq}: {e}")))?;
        let transport =
            MmioTransport::new(&name, device, mem.clone(), irqfd).map_err(|e| Error::Device(format!("{name}: {e}")))?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY), queue as u32)
                .map_err(|e| Error::Device(format!("{name}: queue {queue} notification: {e}")))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(base, VIRTIO_MMIO_WINDOW, transport.clone()).map_err(|e| Error::Device(format!("{name}: {e}")))?;
        transports.push(transport);
        cmdline.add_virtio_mmio_device(VIRTIO_MMIO_WINDOW, GuestAddress(base), irq, None)?;
        tracing::info!("{name} at {base:#x}, IRQ {irq}");
    }
    Ok(transports)
}

/// virtio-pci: a function on the PCI root each, BAR 0 assigned here, MSI-X through KVM routes.
/// The MSI-X vectors take GSIs from `next_gsi` on, which is left at the first one free.
fn attach_pci(
    vm: &Arc<VmFd>,
    mem: &GuestMemory,
    devices: Vec<(String, Box<dyn VirtioDevice>)>,
    root: &mut PciRoot,
    router: Arc<GsiRouter>,
    mmio: &mut Bus,
    next_gsi: &mut u32,
) -> Result<Vec<Arc<Mutex<PciTransport>>>, Error> {
    let mut transports = Vec::new();
    for (i, (name, device)) in devices.into_iter().enumerate() {
        let err = device_err(&name);
        let bar = PCI_BAR_START + i as u64 * PCI_BAR_STRIDE;
        let mut gsis = Vec::new();
        let mut irqfds = Vec::new();
        for v in 0..virtio::pci::vectors_for(device.queue_max_sizes().len()) {
            let gsi = *next_gsi;
            *next_gsi += 1;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| err(e.to_string()))?;
            vm.register_irqfd(&irqfd, gsi).map_err(|e| err(format!("MSI-X vector {v}: {e}")))?;
            gsis.push(gsi);
            irqfds.push(irqfd);
        }
        let transport = PciTransport::new(&name, device, mem.clone(), bar, gsis, irqfds, router.clone())
            .map_err(|e| err(e.to_string()))?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            let at = IoEventAddress::Mmio(bar + virtio::pci::notify_offset(queue));
            vm.register_ioevent(evt, &at, NoDatamatch).map_err(|e| err(format!("queue {queue} notification: {e}")))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(bar, virtio::pci::BAR_SIZE, transport.clone()).map_err(|e| err(e.to_string()))?;
        transports.push(transport.clone());
        let slot = root.add(transport).ok_or_else(|| err("the PCI bus is full".into()))?;
        tracing::info!("{name} at PCI 00:{slot:02x}.0, BAR 0 at {bar:#x}");
    }
    Ok(transports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_macs_are_stable_per_id_and_distinct_per_interface() {
        let a = default_mac(Some("vm-1"), 0);
        assert_eq!(a, default_mac(Some("vm-1"), 0), "a relaunch keeps the address");
        assert_ne!(a, default_mac(Some("vm-2"), 0));
        assert_ne!(a, default_mac(Some("vm-1"), 1));
        assert_eq!(a[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(default_mac(None, 0)[2..5], std::process::id().to_be_bytes()[1..]);
    }
}
