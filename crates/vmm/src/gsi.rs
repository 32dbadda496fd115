//! The VM's interrupt routing table. KVM replaces the whole table on every update, so it is
//! kept here: the in-kernel PIC and IOAPIC pins (KVM's default routes) plus the MSI route of
//! each MSI-X vector the guest enabled.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KvmIrqRouting, kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi,
};
use kvm_ioctls::VmFd;

use arch::layout::IOAPIC_PINS;

/// GSIs below this are the IOAPIC's pins; MSI vectors take the ones above.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS as u32;

pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, (u64, u32)>>,
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    e.u.irqchip = kvm_irq_routing_irqchip { irqchip, pin };
    e
}

fn msi_route(gsi: u32, addr: u64, data: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
    e.u.msi =
        kvm_irq_routing_msi { address_lo: addr as u32, address_hi: (addr >> 32) as u32, data, ..Default::default() };
    e
}

/// KVM's default routes: GSIs 0-15 to the PICs and every GSI to the IOAPIC pin of its number.
pub fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..u32::from(IOAPIC_PINS) {
        if gsi < 16 {
            let chip = if gsi < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE };
            routes.push(irqchip_route(gsi, chip, gsi % 8));
        }
        routes.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    routes
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> GsiRouter {
        GsiRouter { vm, msi: Mutex::new(BTreeMap::new()) }
    }

    fn apply(&self, msi: &BTreeMap<u32, (u64, u32)>) {
        let mut entries = default_routes();
        entries.extend(msi.iter().map(|(&gsi, &(addr, data))| msi_route(gsi, addr, data)));
        match KvmIrqRouting::from_entries(&entries) {
            Ok(table) => {
                if let Err(e) = self.vm.set_gsi_routing(&table) {
                    tracing::warn!("KVM refused the interrupt routing table ({e}); MSI-X interrupts may be lost");
                }
            }
            Err(e) => tracing::warn!("the interrupt routing table is too large ({e:?})"),
        }
    }
}

impl virtio::pci::MsiRouter for GsiRouter {
    /// One KVM_SET_GSI_ROUTING for the whole change, and none when nothing changed.
    fn set_routes(&self, routes: &[(u32, Option<(u64, u32)>)]) {
        let mut table = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for &(gsi, msi) in routes {
            changed |= match msi {
                Some(route) => table.insert(gsi, route) != Some(route),
                None => table.remove(&gsi).is_some(),
            };
        }
        if changed {
            self.apply(&table);
        }
    }

    fn attach_irqfd(&self, gsi: u32, irqfd: &vmm_sys_util::eventfd::EventFd, attached: bool) -> Result<(), String> {
        let result = if attached { self.vm.register_irqfd(irqfd, gsi) } else { self.vm.unregister_irqfd(irqfd, gsi) };
        result.map_err(|e| {
            format!("KVM refused to {} the irqfd of GSI {gsi} ({e})", if attached { "attach" } else { "detach" })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvms() {
        let routes = default_routes();
        assert_eq!(routes.len(), 16 + 24);
        // SAFETY: every default route was built with its irqchip union member.
        let pin = |e: &kvm_irq_routing_entry| unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) };
        assert_eq!(pin(&routes[0]), (KVM_IRQCHIP_PIC_MASTER, 0));
        assert_eq!(pin(&routes[1]), (KVM_IRQCHIP_IOAPIC, 0));
        let irq10: Vec<_> = routes.iter().filter(|e| e.gsi == 10).map(pin).collect();
        assert_eq!(irq10, [(KVM_IRQCHIP_PIC_SLAVE, 2), (KVM_IRQCHIP_IOAPIC, 10)]);
        assert!(routes.iter().filter(|e| e.gsi >= 16).all(|e| pin(e).0 == KVM_IRQCHIP_IOAPIC));
    }
}
