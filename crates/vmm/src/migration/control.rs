//! The controller's side of migrations: which one is under way, the API's requests about it,
//! and what its thread asks of the VM (captured on the source, built on the destination).

use std::sync::Arc;
use std::time::Instant;

use api::models;
use kvm_ioctls::Kvm;

use arch::GuestMemory;

use super::receive::Incoming;
use super::send::{Outcome, Outgoing, SendOptions};
use super::{Phase, Status};
use crate::config::{HostLimits, SerialConfig, VmConfig};
use crate::exit::ExitLatch;
use crate::snapshot::Snapshot;
use crate::vm::{RunningVm, Shell};

enum Migration {
    Out(Outgoing),
    In(Incoming),
}

/// The migration under way, or the last one.
#[derive(Default)]
pub struct Migrations {
    current: Option<Migration>,
    /// What the receive request said of the arriving VM's host ends (TAPs, disks, vsock).
    overrides: Option<models::MigrationReceive>,
    /// Started to receive a VM (`run --incoming`): a migration that brings none ends the VMM.
    incoming_only: bool,
    /// The arriving VM's shell, made while its pages arrive.
    shell: Option<Shell>,
}

/// What a migration thread needs of the controller.
pub enum Event {
    Nothing,
    /// The VM runs on the destination: this VMM stops.
    Moved(String),
    /// `run --incoming` got no VM: this VMM stops.
    NotReceived(String),
    /// A VM arrived: the controller builds it ([`build`]) and answers [`Migrations::built`].
    Arrived(Box<(Snapshot, GuestMemory)>),
}

impl Migrations {
    /// The receive request of the migration under way here, for the VM it brings.
    pub fn overrides(&self) -> Option<&models::MigrationReceive> {
        self.overrides.as_ref()
    }

    fn status_of(&self) -> Option<Status> {
        match self.current.as_ref()? {
            Migration::Out(out) => Some(out.status()),
            Migration::In(incoming) => Some(incoming.status()),
        }
    }

    fn under_way(&self) -> bool {
        self.status_of().is_some_and(|s| !matches!(s.phase, Phase::Completed | Phase::Failed | Phase::Cancelled))
    }

    /// `GET /ferrovisor/migration`.
    pub fn status(&self) -> Result<Status, String> {
        self.status_of().ok_or_else(|| "No migration has started; PUT /ferrovisor/migration/send or receive.".into())
    }

    /// `PUT /ferrovisor/migration/cancel`.
    pub fn cancel(&self) -> Result<(), String> {
        match &self.current {
            Some(Migration::Out(out)) => out.cancel(),
            Some(Migration::In(incoming)) => incoming.cancel(),
            None => Err("No migration is under way.".into()),
        }
    }

    /// `PUT /ferrovisor/migration/send`: the running VM starts moving.
    pub fn send(
        &mut self,
        vm: &mut RunningVm,
        config: &VmConfig,
        m: &models::MigrationSend,
        latch: &Arc<ExitLatch>,
    ) -> Result<(), String> {
        if self.under_way() {
            return Err("A migration is under way already; wait for it or cancel it.".into());
        }
        let options = SendOptions::from_request(m)?;
        self.current = Some(Migration::Out(Outgoing::start(vm, config, options, latch)?));
        Ok(())
    }

    /// `PUT /ferrovisor/migration/receive` (or `run --incoming` when `only`): a VMM with no VM
    /// waits on `url` for one.
    pub fn receive(
        &mut self,
        m: &models::MigrationReceive,
        limits: HostLimits,
        latch: &Arc<ExitLatch>,
        only: bool,
    ) -> Result<(), String> {
        if self.under_way() {
            return Err("A migration is under way already; wait for it or cancel it.".into());
        }
        self.current = Some(Migration::In(Incoming::start(m, limits, latch)?));
        self.overrides = Some(m.clone());
        self.incoming_only = only;
        Ok(())
    }

    /// What the migration thread asks for now, if anything; on the source `vm` is the running
    /// VM, which is captured here when the switch-over is due.
    pub fn poll(&mut self, vm: Option<(&mut RunningVm, &VmConfig)>, kvm: &Kvm) -> Event {
        match (&self.current, vm) {
            (Some(Migration::Out(out)), Some((vm, config))) => match out.poll(vm, kvm, config) {
                Outcome::Moved(to) => Event::Moved(to),
                Outcome::Running | Outcome::Failed => Event::Nothing,
            },
            (Some(Migration::In(incoming)), None) => {
                if let Some((config, mem)) = incoming.take_shell_due() {
                    self.shell = Shell::new(kvm, &config, &mem)
                        .inspect_err(|e| tracing::debug!("migration: the VM cannot be built ahead of its state ({e})"))
                        .ok();
                    incoming.shell_made();
                }
                if let Some(arrived) = incoming.take_arrived() {
                    return Event::Arrived(Box::new(arrived));
                }
                let finished = incoming.take_finished();
                if finished.is_some() {
                    // A shell no VM came for lets its memory go.
                    self.shell = None;
                }
                match finished {
                    Some(Err(e)) if self.incoming_only => Event::NotReceived(e),
                    _ => Event::Nothing,
                }
            }
            _ => Event::Nothing,
        }
    }

    /// The shell made for the VM that arrived, if any.
    pub fn take_shell(&mut self) -> Option<Shell> {
        self.shell.take()
    }

    /// Tells the destination's thread whether the VM that arrived runs.
    pub fn built(&self, result: Result<(), String>) {
        if let Some(Migration::In(incoming)) = &self.current {
            incoming.built(result);
        }
    }
}

/// Builds and resumes a VM that migrated here (in `shell` where one was made): its
/// configuration checked whole (the files it names too, which the migration thread may not
/// open), its serial output on this process's stdout.
pub fn build(
    kvm: &Kvm,
    (mut saved, mem): (Snapshot, GuestMemory),
    shell: Option<Shell>,
    overrides: Option<&models::MigrationReceive>,
    limits: &HostLimits,
    launched: Instant,
    latch: &Arc<ExitLatch>,
) -> Result<(RunningVm, VmConfig), String> {
    if let Some(o) = overrides {
        let config = &mut saved.config;
        let what = "migrated VM";
        crate::resources::snapshot::apply_overrides(config, &o.network_overrides, o.vsock_override.as_ref(), what)?;
        for d in &o.drive_overrides {
            let Some(disk) = config.disks.iter_mut().find(|disk| disk.id == d.drive_id && disk.vhost_user.is_none())
            else {
                return Err(format!(
                    "drive_overrides: the migrated VM has no drive {} on an image; leave it out.",
                    d.drive_id
                ));
            };
            disk.path = d.path_on_host.clone().into();
        }
    }
    saved.config.validate_machine(limits).map_err(|e| format!("the migrated configuration is refused: {e}"))?;
    saved.config.serial = SerialConfig::Stdio;
    if let Some(m) = saved.config.mmds {
        crate::resources::mmds::restore(m, saved.mmds_data.take())?;
    }
    let how = crate::vm::Restore { resume: true, clock_realtime: false };
    let (mut vm, config) =
        crate::vm::restore_with_memory(kvm, saved, mem, shell, launched, latch, how).map_err(|e| e.to_string())?;
    vm.announce_moved();
    Ok((vm, config))
}
