//! Boots hand-made guests of a few dozen instructions: serial output, the CMOS clock, the boot
//! timer, the i8042 reset, SMP start-up, and the report for a guest that cannot go on.

mod common;

use std::time::Duration;

use common::{Running, host_emulates_ring0, run_tiny_guest, scratch_dir, tiny_guest_command};

/// 64-bit code: prints a greeting and the CMOS year on COM1, pokes the boot timer, then resets
/// through the i8042.
///
/// ```text
///   mov dx, 0x3f8 ; lea rsi, [rip+msg] ; mov ecx, msg_len ; rep outsb
///   mov al, 0x32 ; out 0x70, al ; in al, 0x71 ; call print_bcd      (century)
///   mov al, 0x09 ; out 0x70, al ; in al, 0x71 ; call print_bcd      (year)
///   mov al, 0x0a ; out dx, al
///   mov edi, 0xc0000000 ; mov byte [rdi], 123                        (boot timer)
///   mov al, 0xfe ; out 0x64, al ; 1: hlt ; jmp 1b                    (i8042 reset)
/// print_bcd: mov bl, al ; shr al, 4 ; add al, '0' ; out dx, al
///   mov al, bl ; and al, 0x0f ; add al, '0' ; out dx, al ; ret
/// msg: "hello from a tiny guest\nyear "
/// ```
const HELLO: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0x48, 0x8d, 0x35, 0x3f, 0x00, 0x00, 0x00, 0xb9, 0x1d, 0x00, 0x00, 0x00, 0xf3, 0x6e, 0xb0,
    0x32, 0xe6, 0x70, 0xe4, 0x71, 0xe8, 0x1d, 0x00, 0x00, 0x00, 0xb0, 0x09, 0xe6, 0x70, 0xe4, 0x71, 0xe8, 0x12, 0x00,
    0x00, 0x00, 0xb0, 0x0a, 0xee, 0xbf, 0x00, 0x00, 0x00, 0xc0, 0xc6, 0x07, 0x7b, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb,
    0xfd, 0x88, 0xc3, 0xc0, 0xe8, 0x04, 0x04, 0x30, 0xee, 0x88, 0xd8, 0x24, 0x0f, 0x04, 0x30, 0xee, 0xc3, b'h', b'e',
    b'l', b'l', b'o', b' ', b'f', b'r', b'o', b'm', b' ', b'a', b' ', b't', b'i', b'n', b'y', b' ', b'g', b'u', b'e',
    b's', b't', b'\n', b'y', b'e', b'a', b'r', b' ',
];

/// The boot vCPU (64-bit) prints "APIC <id>" from CPUID leaf 1, copies a real-mode trampoline
/// to 0x10000 and starts the other vCPUs with INIT-SIPI-SIPI through the xAPIC ICR; each AP
/// prints its own "APIC <id>", sets a flag at 0x5000 and halts; the BSP waits for the flag and
/// resets.
///
/// ```text
/// bsp:  mov eax, 1 ; cpuid ; shr ebx, 24 ; call report
///       lea rsi, [rip+tramp] ; mov edi, 0x10000 ; mov ecx, tramp_len ; rep movsb
///       mov edi, 0xfee00300 ; mov dword [rdi], 0x000c4500    (INIT, all but self)
///       mov dword [rdi], 0x000c4610 ; mov dword [rdi], 0x000c4610   (SIPI vector 0x10, twice)
/// wait: cmp byte [0x5000], 1 ; jne wait
///       mov al, 0xfe ; out 0x64, al ; 1: hlt ; jmp 1b
/// report: mov dx, 0x3f8 ; lea rsi, [rip+label] ; mov ecx, 5 ; rep outsb
///       mov al, bl ; add al, '0' ; out dx, al ; mov al, 0x0a ; out dx, al ; ret
/// label: "APIC "
/// tramp (16-bit): mov eax, 1 ; cpuid ; shr ebx, 24 ; mov dx, 0x3f8
///       mov al, 'A' ; out dx, al ; ... "PIC " ... ; mov al, bl ; add al, '0' ; out dx, al
///       mov al, 0x0a ; out dx, al ; mov byte [0x5000], 1 ; 2: cli ; hlt ; jmp 2b
/// ```
const SMP: &[u8] = &[
    0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0xa2, 0xc1, 0xeb, 0x18, 0xe8, 0x3b, 0x00, 0x00, 0x00, 0x48, 0x8d, 0x35, 0x54,
    0x00, 0x00, 0x00, 0xbf, 0x00, 0x00, 0x01, 0x00, 0xb9, 0x2f, 0x00, 0x00, 0x00, 0xf3, 0xa4, 0xbf, 0x00, 0x03, 0xe0,
    0xfe, 0xc7, 0x07, 0x00, 0x45, 0x0c, 0x00, 0xc7, 0x07, 0x10, 0x46, 0x0c, 0x00, 0xc7, 0x07, 0x10, 0x46, 0x0c, 0x00,
    0x80, 0x3c, 0x25, 0x00, 0x50, 0x00, 0x00, 0x01, 0x75, 0xf6, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd, 0x66, 0xba,
    0xf8, 0x03, 0x48, 0x8d, 0x35, 0x10, 0x00, 0x00, 0x00, 0xb9, 0x05, 0x00, 0x00, 0x00, 0xf3, 0x6e, 0x88, 0xd8, 0x04,
    0x30, 0xee, 0xb0, 0x0a, 0xee, 0xc3, 0x41, 0x50, 0x49, 0x43, 0x20, 0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0xa2,
    0x66, 0xc1, 0xeb, 0x18, 0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee, 0xb0, 0x50, 0xee, 0xb0, 0x49, 0xee, 0xb0, 0x43, 0xee,
    0xb0, 0x20, 0xee, 0x88, 0xd8, 0x04, 0x30, 0xee, 0xb0, 0x0a, 0xee, 0xc6, 0x06, 0x00, 0x50, 0x01, 0xfa, 0xf4, 0xeb,
    0xfc,
];

/// `int3` with no IDT: hosts that emulate ring 0 cannot run it; hardware turns it into a
/// triple fault. Either way the VM cannot go on.
const INT3: &[u8] = &[0xcc, 0xf4];

/// Prints the zero page's e820 entry count as a digit and resets.
///
/// ```text
///   mov dx, 0x3f8 ; mov al, [0x7000 + 0x1e8] ; add al, '0' ; out dx, al
///   mov al, 0x0a ; out dx, al ; mov al, 0xfe ; out 0x64, al ; hlt
/// ```
const E820_COUNT: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0x8a, 0x04, 0x25, 0xe8, 0x71, 0x00, 0x00, 0x04, 0x30, 0xee, 0xb0, 0x0a, 0xee, 0xb0, 0xfe,
    0xe6, 0x64, 0xf4,
];

/// `jmp $`: spins until the VMM stops it.
const SPIN: &[u8] = &[0xeb, 0xfe];

/// `ud2` with no IDT: #UD, then #GP and #DF with no handler, a triple fault on any host.
const UD2: &[u8] = &[0x90, 0x0f, 0x0b];

fn current_year() -> u64 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    // Days to civil year, good for 1970..2100 (every fourth year a leap year).
    let days = secs / 86_400;
    1970 + (days * 4 + 2) / 1461
}

#[test]
fn tiny_guest_writes_serial_reads_the_rtc_and_resets_cleanly() {
    let out = run_tiny_guest("hello", HELLO, 1, 16);
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(out.stdout, format!("hello from a tiny guest\nyear {}\n", current_year()), "{}", out.describe());
    assert!(out.stderr.contains("guest requested a reset"), "{}", out.describe());
    assert!(out.stderr.contains("guest boot time:"), "boot timer logged: {}", out.describe());
}

#[test]
fn two_vcpus_start_and_report_distinct_apic_ids() {
    let out = run_tiny_guest("smp", SMP, 2, 16);
    assert!(out.status.success(), "{}", out.describe());
    let mut ids: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("APIC ")).collect();
    ids.sort();
    assert_eq!(ids, ["APIC 0", "APIC 1"], "{}", out.describe());
}

#[test]
fn guest_that_cannot_go_on_gets_a_readable_report_and_a_failure_status() {
    let out = run_tiny_guest("int3", INT3, 1, 16);
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    let report =
        out.stderr.lines().find(|l| l.contains("vCPU 0 stopped on")).unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(report.contains("RIP 0x100000 (64-bit long mode, CPL 0)"), "{report}");
    assert!(report.contains("instruction bytes at RIP: cc f4"), "{report}");
    if host_emulates_ring0() {
        assert!(report.contains("KVM_EXIT_INTERNAL_ERROR, suberror 1: instruction emulation failed"), "{report}");
    } else {
        assert!(report.contains("KVM_EXIT_SHUTDOWN"), "{report}");
    }
}

#[test]
fn triple_fault_is_reported_with_the_faulting_instruction() {
    let out = run_tiny_guest("ud2", UD2, 1, 16);
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    let report =
        out.stderr.lines().find(|l| l.contains("vCPU 0 stopped on")).unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(report.contains("a triple fault (KVM_EXIT_SHUTDOWN) at RIP 0x100001"), "{report}");
    assert!(report.contains("instruction bytes at RIP: 0f 0b"), "{report}");
}

#[test]
fn ram_above_the_mmio_hole_gets_its_own_e820_entry() {
    let small = run_tiny_guest("e820-small", E820_COUNT, 1, 16);
    assert!(small.status.success(), "{}", small.describe());
    assert_eq!(small.stdout, "3\n", "RAM, reserved BIOS area, RAM from 1 MiB: {}", small.describe());
    // 4.5 GiB: 3 GiB below the hole and 1.5 GiB from 4 GiB. Guest RAM is mapped lazily, so this
    // costs the host nothing it does not touch.
    let large = run_tiny_guest("e820-large", E820_COUNT, 1, 4608);
    assert!(large.status.success(), "{}", large.describe());
    assert_eq!(large.stdout, "4\n", "{}", large.describe());
}

#[test]
fn sigint_stops_spinning_and_sleeping_vcpus_with_status_0() {
    let dir = scratch_dir("sigint");
    // The boot vCPU spins; the second waits for a SIPI that never comes, blocked in KVM.
    let mut vm = Running::start(tiny_guest_command(&dir, SPIN, 2, 16));
    // Both vCPU threads run before the signal: the spinning one burns CPU, and the process
    // is alive.
    std::thread::sleep(Duration::from_millis(500));
    assert!(vm.child.try_wait().unwrap().is_none(), "still running before the signal");
    let pid = vm.child.id();
    let vcpus: Vec<u64> =
        common::thread_cpu_ticks(pid).into_iter().filter(|(n, _)| n.starts_with("fc_vcpu")).map(|(_, t)| t).collect();
    assert_eq!(vcpus.len(), 2, "two vCPU threads");
    assert!(vcpus.iter().any(|&ticks| ticks > 0), "the spinning vCPU ran: {vcpus:?}");
    // SAFETY: signalling a child process this test started and has not yet reaped.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGINT) };
    let out = vm.finish(Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert!(out.stderr.contains("stopped the VM on signal 2 (SIGINT)"), "{}", out.describe());
    let _ = std::fs::remove_dir_all(dir);
}
