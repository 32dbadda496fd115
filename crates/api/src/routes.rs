//! From a method, a path and a body to a typed [`Request`], or to the 4xx that says what is
//! wrong and how to fix it.

use serde::de::DeserializeOwned;

use crate::Response;
use crate::models::*;

/// Every request the server understands.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    GetInfo,
    GetVersion,
    GetVmConfig,
    GetMachineConfig,
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigUpdate),
    PutBootSource(BootSource),
    PutDrive(Drive),
    PatchDrive(PartialDrive),
    PutNetworkInterface(NetworkInterface),
    PatchNetworkInterface(PartialNetworkInterface),
    PutVsock(Vsock),
    PutEntropy(Entropy),
    PutSerial(Serial),
    PutCpuConfig(CpuConfig),
    PutPmem(Pmem),
    PatchPmem(PartialPmem),
    PutMemoryHotplug(MemoryHotplugConfig),
    PatchMemoryHotplug(MemoryHotplugSizeUpdate),
    GetMemoryHotplug,
    /// Ferrovisor's: an interface's firewall rules.
    PutFirewall(String, net::firewall::RuleSetSpec),
    GetFirewall(String),
    /// Ferrovisor's: an assigned PCI device, before boot.
    PutDevice(PassthroughDevice),
    PutFs(FsDevice),
    GetMmds,
    PutMmds(serde_json::Value),
    PatchMmds(serde_json::Value),
    PutMmdsConfig(MmdsConfig),
    GetBalloon,
    PutBalloon(Balloon),
    PatchBalloon(BalloonUpdate),
    GetBalloonStats,
    PatchBalloonStats(BalloonStatsUpdate),
    StartBalloonHinting(BalloonHintingStart),
    GetBalloonHinting,
    StopBalloonHinting,
    Action(ActionType),
    PatchVm(VmStateChange),
    CreateSnapshot(SnapshotCreate),
    LoadSnapshot(SnapshotLoad),
    PutLogger(Logger),
    PutMetrics(Metrics),
    PutMemory(MemoryOptions),
    GetStats,
    GetMetrics {
        prometheus: bool,
    },
    /// Stops the VMM cleanly (exit status 0), like SIGTERM.
    Stop,
    MigrationReceive(MigrationReceive),
    MigrationSend(MigrationSend),
    MigrationCancel,
    GetMigration,
}

/// The routes, as (method, path template): what the OpenAPI document must list.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/version"),
    ("GET", "/vm/config"),
    ("GET", "/machine-config"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/boot-source"),
    ("PUT", "/drives/{drive_id}"),
    ("PATCH", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PUT", "/vsock"),
    ("PUT", "/entropy"),
    ("PUT", "/serial"),
    ("PUT", "/cpu-config"),
    ("PUT", "/pmem/{id}"),
    ("PATCH", "/pmem/{id}"),
    ("PUT", "/hotplug/memory"),
    ("PATCH", "/hotplug/memory"),
    ("GET", "/hotplug/memory"),
    ("GET", "/mmds"),
    ("PUT", "/mmds"),
    ("PATCH", "/mmds"),
    ("PUT", "/mmds/config"),
    ("GET", "/balloon"),
    ("PUT", "/balloon"),
    ("PATCH", "/balloon"),
    ("GET", "/balloon/statistics"),
    ("PATCH", "/balloon/statistics"),
    ("PATCH", "/balloon/hinting/start"),
    ("GET", "/balloon/hinting/status"),
    ("PATCH", "/balloon/hinting/stop"),
    ("PUT", "/actions"),
    ("PATCH", "/vm"),
    ("PUT", "/snapshot/create"),
    ("PUT", "/snapshot/load"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("PUT", "/ferrovisor/memory"),
    ("GET", "/ferrovisor/stats"),
    ("GET", "/ferrovisor/metrics"),
    ("PUT", "/ferrovisor/stop"),
    ("PUT", "/ferrovisor/firewall/{iface_id}"),
    ("GET", "/ferrovisor/firewall/{iface_id}"),
    ("PUT", "/ferrovisor/devices/{id}"),
    ("PUT", "/ferrovisor/fs/{tag}"),
    ("PUT", "/ferrovisor/migration/receive"),
    ("PUT", "/ferrovisor/migration/send"),
    ("PUT", "/ferrovisor/migration/cancel"),
    ("GET", "/ferrovisor/migration"),
];

/// Parses one request. `path` may carry a query string (only `/ferrovisor/metrics` reads it).
pub fn parse(method: &str, target: &str, body: &[u8]) -> Result<Request, Response> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let template = template_of(&segments).ok_or_else(|| {
        Response::error(404, format!("There is no API path {path}; the paths are listed in docs/api/openapi.json."))
    })?;
    let allowed: Vec<&str> = ROUTES.iter().filter(|(_, t)| *t == template).map(|(m, _)| *m).collect();
    if !allowed.contains(&method) {
        return Err(Response::error(405, format!("{template} does not take {method}; use {}.", allowed.join(" or ")))
            .with_header("Allow", allowed.join(", ")));
    }
    let what = format!("{method} {template}");
    let id = segments.get(1).copied().unwrap_or("");
    let request = match (method, template) {
        ("GET", "/") => Request::GetInfo,
        ("GET", "/version") => Request::GetVersion,
        ("GET", "/vm/config") => Request::GetVmConfig,
        ("GET", "/machine-config") => Request::GetMachineConfig,
        ("PUT", "/machine-config") => Request::PutMachineConfig(body_of(&what, body)?),
        ("PATCH", "/machine-config") => Request::PatchMachineConfig(body_of(&what, body)?),
        ("PUT", "/boot-source") => Request::PutBootSource(body_of(&what, body)?),
        ("PUT", "/drives/{drive_id}") => {
            let drive: Drive = body_of(&what, body)?;
            same_id(&what, "drive_id", id, &drive.drive_id)?;
            Request::PutDrive(drive)
        }
        ("PATCH", "/drives/{drive_id}") => {
            let drive: PartialDrive = body_of(&what, body)?;
            same_id(&what, "drive_id", id, &drive.drive_id)?;
            Request::PatchDrive(drive)
        }
        ("PUT", "/network-interfaces/{iface_id}") => {
            let iface: NetworkInterface = body_of(&what, body)?;
            same_id(&what, "iface_id", id, &iface.iface_id)?;
            Request::PutNetworkInterface(iface)
        }
        ("PATCH", "/network-interfaces/{iface_id}") => {
            let iface: PartialNetworkInterface = body_of(&what, body)?;
            same_id(&what, "iface_id", id, &iface.iface_id)?;
            Request::PatchNetworkInterface(iface)
        }
        ("PUT", "/vsock") => Request::PutVsock(body_of(&what, body)?),
        ("PUT", "/entropy") => Request::PutEntropy(body_of(&what, body)?),
        ("PUT", "/serial") => Request::PutSerial(body_of(&what, body)?),
        ("PUT", "/cpu-config") => Request::PutCpuConfig(body_of(&what, body)?),
        ("PUT", "/pmem/{id}") => {
            let pmem: Pmem = body_of(&what, body)?;
            same_id(&what, "id", id, &pmem.id)?;
            Request::PutPmem(pmem)
        }
        ("PATCH", "/pmem/{id}") => {
            let pmem: PartialPmem = body_of(&what, body)?;
            same_id(&what, "id", id, &pmem.id)?;
            Request::PatchPmem(pmem)
        }
        ("PUT", "/hotplug/memory") => Request::PutMemoryHotplug(body_of(&what, body)?),
        ("PATCH", "/hotplug/memory") => Request::PatchMemoryHotplug(body_of(&what, body)?),
        ("GET", "/hotplug/memory") => Request::GetMemoryHotplug,
        ("GET", "/mmds") => Request::GetMmds,
        ("PUT", "/mmds") => Request::PutMmds(body_of(&what, body)?),
        ("PATCH", "/mmds") => Request::PatchMmds(body_of(&what, body)?),
        ("PUT", "/mmds/config") => Request::PutMmdsConfig(body_of(&what, body)?),
        ("GET", "/balloon") => Request::GetBalloon,
        ("PUT", "/balloon") => Request::PutBalloon(body_of(&what, body)?),
        ("PATCH", "/balloon") => Request::PatchBalloon(body_of(&what, body)?),
        ("GET", "/balloon/statistics") => Request::GetBalloonStats,
        ("PATCH", "/balloon/statistics") => Request::PatchBalloonStats(body_of(&what, body)?),
        // Clients send these with no body or an empty one.
        ("PATCH", "/balloon/hinting/start") => {
            Request::StartBalloonHinting(match body.iter().all(u8::is_ascii_whitespace) {
                true => BalloonHintingStart { acknowledge_on_stop: true },
                false => body_of(&what, body)?,
            })
        }
        ("GET", "/balloon/hinting/status") => Request::GetBalloonHinting,
        ("PATCH", "/balloon/hinting/stop") => {
            if !body.iter().all(u8::is_ascii_whitespace) {
                body_of::<NoFields>(&what, body)?;
            }
            Request::StopBalloonHinting
        }
        ("PUT", "/actions") => Request::Action(body_of::<InstanceAction>(&what, body)?.action_type),
        ("PATCH", "/vm") => Request::PatchVm(body_of::<VmState>(&what, body)?.state),
        ("PUT", "/snapshot/create") => Request::CreateSnapshot(body_of(&what, body)?),
        ("PUT", "/snapshot/load") => Request::LoadSnapshot(body_of(&what, body)?),
        ("PUT", "/logger") => Request::PutLogger(body_of(&what, body)?),
        ("PUT", "/metrics") => Request::PutMetrics(body_of(&what, body)?),
        ("PUT", "/ferrovisor/memory") => Request::PutMemory(body_of(&what, body)?),
        ("GET", "/ferrovisor/stats") => Request::GetStats,
        ("PUT", "/ferrovisor/stop") => Request::Stop,
        ("PUT", "/ferrovisor/migration/receive") => Request::MigrationReceive(body_of(&what, body)?),
        ("PUT", "/ferrovisor/migration/send") => Request::MigrationSend(body_of(&what, body)?),
        ("PUT", "/ferrovisor/migration/cancel") => {
            if !body.iter().all(u8::is_ascii_whitespace) {
                body_of::<NoFields>(&what, body)?;
            }
            Request::MigrationCancel
        }
        ("GET", "/ferrovisor/migration") => Request::GetMigration,
        ("PUT", "/ferrovisor/firewall/{iface_id}") => {
            let rules: net::firewall::RuleSetSpec = body_of(&what, body)?;
            // Checked here, so that a bad rule is answered before anything changes.
            rules.check().map_err(|e| Response::error(400, format!("{what}: {e}.")))?;
            Request::PutFirewall(segments[2].to_string(), rules)
        }
        ("GET", "/ferrovisor/firewall/{iface_id}") => Request::GetFirewall(segments[2].to_string()),
        ("PUT", "/ferrovisor/devices/{id}") => {
            let device: PassthroughDevice = body_of(&what, body)?;
            same_id(&what, "id", segments[2], &device.id)?;
            Request::PutDevice(device)
        }
        ("PUT", "/ferrovisor/fs/{tag}") => {
            let fs: FsDevice = body_of(&what, body)?;
            same_id(&what, "tag", segments[2], &fs.tag)?;
            Request::PutFs(fs)
        }
        ("GET", "/ferrovisor/metrics") => match query {
            "" | "format=json" => Request::GetMetrics { prometheus: false },
            "format=prometheus" => Request::GetMetrics { prometheus: true },
            other => {
                return Err(Response::error(
                    400,
                    format!("GET /ferrovisor/metrics does not take '{other}'; use ?format=json or ?format=prometheus."),
                ));
            }
        },
        _ => unreachable!("every route of ROUTES has a request"),
    };
    Ok(request)
}

/// The route template a path matches, if any (for counting requests).
pub fn template_for(path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    template_of(&segments)
}

/// The route template `segments` match, if any.
fn template_of(segments: &[&str]) -> Option<&'static str> {
    let matches = |template: &str| {
        let parts: Vec<&str> = template.trim_end_matches('/').split('/').skip(1).collect();
        parts.len() == segments.len()
            && parts.iter().zip(segments).all(|(p, s)| (p.starts_with('{') && !s.is_empty()) || p == s)
    };
    ROUTES.iter().map(|(_, t)| *t).find(|t| matches(t))
}

fn same_id(what: &str, field: &str, in_path: &str, in_body: &str) -> Result<(), Response> {
    if in_path == in_body {
        return Ok(());
    }
    Err(Response::error(
        400,
        format!("{what}: the body's {field} '{in_body}' differs from the path's '{in_path}'; make them the same."),
    ))
}

/// Deserializes a JSON body; the error names the field and says what it takes.
pub fn body_of<T: DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Response::error(400, format!("{what} needs a JSON body; see docs/api/openapi.json.")));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(crate::strict::ObjectsOnly(&mut de))
        .map_err(|e| Response::error(400, describe(what, &e)))?;
    de.end().map_err(|e| {
        Response::error(
            400,
            format!("{what}: the body is not valid JSON ({e}); send one JSON object and nothing after it."),
        )
    })?;
    Ok(value)
}

/// One sentence from a serde error: where in the body, what went wrong, what to do.
fn describe(what: &str, e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let path = e.path().to_string();
    let inner = e.inner();
    let message = inner.to_string();
    // serde_json appends " at line L column C"; the field name says more.
    let message = message.split(" at line ").next().unwrap_or(&message);
    match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            format!(
                "{what}: the body is not valid JSON ({message}, line {} column {}); fix the syntax.",
                inner.line(),
                inner.column()
            )
        }
        _ if message.starts_with("unknown field") => {
            let place = if path == "." { String::new() } else { format!(" in {path}") };
            format!("{what}: {message}{place}; remove it.")
        }
        _ if message.starts_with("missing field") => {
            let place = if path == "." { String::new() } else { format!(" in {path}") };
            format!("{what}: {message}{place}; add it.")
        }
        _ if path == "." => format!("{what}: {message}; send a JSON object with the documented fields."),
        _ => format!("{what}: field {path}: {message}; give it a value of that type."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(r: Result<Request, Response>) -> (u16, String) {
        let r = r.expect_err("an error");
        (r.status, r.fault_message().unwrap_or_default())
    }

    #[test]
    fn good_requests_parse() {
        assert_eq!(parse("GET", "/", b"").unwrap(), Request::GetInfo);
        let r = parse("PUT", "/machine-config", br#"{"vcpu_count": 2, "mem_size_mib": 256}"#).unwrap();
        let Request::PutMachineConfig(m) = r else { panic!() };
        assert_eq!((m.vcpu_count, m.mem_size_mib, m.smt), (2, 256, false));
        let r = parse("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#).unwrap();
        assert_eq!(r, Request::Action(ActionType::InstanceStart));
        let r = parse("PUT", "/drives/rootfs", br#"{"drive_id":"rootfs","path_on_host":"/x","is_root_device":true}"#);
        assert!(matches!(r, Ok(Request::PutDrive(_))));
        assert_eq!(
            parse("GET", "/ferrovisor/metrics?format=prometheus", b"").unwrap(),
            Request::GetMetrics { prometheus: true }
        );
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let (code, msg) = fault(parse("GET", "/nope", b""));
        assert_eq!(code, 404);
        assert!(msg.contains("/nope"), "{msg}");
        let (code, msg) = fault(parse("DELETE", "/machine-config", b""));
        assert_eq!(code, 405);
        assert!(msg.contains("GET or PUT or PATCH"), "{msg}");
        let (code, msg) = fault(parse("PUT", "/machine-config", br#"{"vcpu_count": "two", "mem_size_mib": 1}"#));
        assert_eq!(code, 400);
        assert!(msg.contains("vcpu_count") && msg.contains("invalid type"), "{msg}");
        let (_, msg) = fault(parse("PUT", "/machine-config", br#"{"mem_size_mib": 1}"#));
        assert!(msg.contains("missing field `vcpu_count`") && msg.contains("add it"), "{msg}");
        let (_, msg) = fault(parse("PUT", "/machine-config", br#"{"vcpu_count": 1, "mem_size_mib": 1, "cpus": 2}"#));
        assert!(msg.contains("unknown field `cpus`") && msg.contains("remove it"), "{msg}");
        let (_, msg) = fault(parse("PUT", "/machine-config", br#"{"vcpu_count": 1,"#));
        assert!(msg.contains("not valid JSON"), "{msg}");
        let (_, msg) = fault(parse("PUT", "/actions", br#"{"action_type": "Reboot"}"#));
        assert!(msg.contains("action_type") && msg.contains("InstanceStart"), "{msg}");
        let (_, msg) =
            fault(parse("PUT", "/drives/a", br#"{"drive_id":"b","path_on_host":"/x","is_root_device":true}"#));
        assert!(msg.contains("differs"), "{msg}");
        let (_, msg) = fault(parse("PUT", "/vsock", b""));
        assert!(msg.contains("needs a JSON body"), "{msg}");
        let (_, msg) = fault(parse("PUT", "/vsock", br#"{"guest_cid": 3, "uds_path": "/x"} trailing"#));
        assert!(msg.contains("not valid JSON"), "{msg}");
    }
}
