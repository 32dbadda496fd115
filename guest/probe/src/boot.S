# Ring 0 of the probe. Hosts that emulate guest ring 0 run every instruction here about 1000x
# slower than native and cannot run SSE, int3/int n, xsave or cmpxchg16b at all, so everything
# that can be static data is (page tables, GDT, IDT, the BSP's TSS) and ring 0 only switches
# modes, answers port I/O for ring 3 and reports exceptions. The probe's logic runs in ring 3.

    .set KCODE, 0x08
    .set KDATA, 0x10
    .set UDATA, 0x18
    .set UCODE, 0x20
    .set TSS0_SEL, 0x28
    .set TSS_AP_SEL, 0x38          # AP n (1-based) uses TSS_AP_SEL + (n - 1) * 16
    .set CR4_BITS, 0x620           # PAE | OSFXSR | OSXMMEXCPT
    .set CR0_BITS, 0x80000033      # PG | NE | ET | MP | PE
    .set USER_RFLAGS, 0x3002       # IOPL 3 (not honoured everywhere: see gp_handler), IF 0
    .set MAX_APS, 15
    .set RESET_MAGIC, 0x7e5e7

# ------------------------------------------------------------------ PVH note
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                        # name size
    .long 8                        # descriptor size
    .long 18                       # XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .balign 4
    .quad pvh_entry

# ------------------------------------------------------------------ BSP entry
    .section .text.boot, "ax"
    .code32
    .globl pvh_entry
pvh_entry:                         # 32-bit protected mode, paging off, %ebx = hvm_start_info
    movb $123, 0xc0000000          # boot timer (Firecracker's magic): marks the first instruction
    movl $CR4_BITS, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx         # EFER
    movl $0x100, %eax              # LME
    xorl %edx, %edx
    wrmsr
    movl $CR0_BITS, %eax
    movl %eax, %cr0
    lgdt gdtr
    ljmp $KCODE, $bsp_long_entry

    .code64
bsp_long_entry:
    movl %ebx, %edi                # first argument: hvm_start_info
    movl $stack0_top, %esp
    movw $TSS0_SEL, %ax
    ltr %ax
    lidt idtr
    pushq $(UDATA | 3)
    pushq $(stack3_top - 8)        # SysV: rsp is 8 mod 16 at a function's entry
    pushq $USER_RFLAGS
    pushq $(UCODE | 3)
    pushq $probe_main
    iretq

# ------------------------------------------------------------------ AP entry
# Real-mode trampoline, copied by ring 3 to 0x8000 (SIPI vector 8), so every reference inside
# it is a difference of labels. Each AP takes the next slot with lock xadd; ring 3 on the BSP
# filled ap_boot_records[slot] (ring-0 stack, ring-3 stack) and the slot's TSS beforehand.
    .code16
    .globl ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_gdtr - ap_trampoline_start)
    movl $CR4_BITS, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    movl $0x100, %eax
    xorl %edx, %edx
    wrmsr
    movl $CR0_BITS, %eax
    movl %eax, %cr0
    ljmpl $KCODE, $ap_long_entry
    .balign 8
ap_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:

    .code64
ap_long_entry:
    movl $1, %eax
    lock xaddl %eax, ap_next_slot  # %eax = this AP's slot, 0-based
    cmpl $MAX_APS, %eax
    jae ap_park
    movl %eax, %edi                # first argument: the slot
    movl %eax, %ecx
    shll $4, %ecx                  # 16 bytes per boot record and per TSS descriptor
    movq ap_boot_records(%rcx), %rsp
    movq ap_boot_records+8(%rcx), %rdx
    leal TSS_AP_SEL(%ecx), %eax
    ltr %ax
    lidt idtr
    pushq $(UDATA | 3)
    pushq %rdx
    pushq $USER_RFLAGS
    pushq $(UCODE | 3)
    pushq $probe_ap_main
    iretq
ap_park:                           # more APs than the probe has room for
    cli
1:  hlt
    jmp 1b

# ------------------------------------------------------------------ exceptions
# Report the exception in the probe's line protocol, then end the VM: i8042 reset, then a
# triple fault (for VMMs without an i8042, such as QEMU microvm with -no-reboot).
isr_common:
    movq %rsp, %rbx
    leaq msg_exception(%rip), %rsi
    call puts0
    movq 0(%rbx), %rax
    call puthex0
    leaq msg_error(%rip), %rsi
    call puts0
    movq 8(%rbx), %rax
    call puthex0
    leaq msg_rip(%rip), %rsi
    call puts0
    movq 16(%rbx), %rax
    call puthex0
    leaq msg_cs(%rip), %rsi
    call puts0
    movq 24(%rbx), %rax
    call puthex0
    leaq msg_cr2(%rip), %rsi
    call puts0
    movq %cr2, %rax
    call puthex0
    movb $10, %al
    movw $0x3f8, %dx
    outb %al, %dx
ring0_reset:
    movb $0xfe, %al
    outb %al, $0x64
    lidt idtr_null
    movabsq $0x8000000000000000, %rax
    movq (%rax), %rax              # #GP with no IDT: triple fault
1:  hlt
    jmp 1b

# #GP from ring 3: some hosts fault port I/O at CPL 3 even with IOPL 3, so ring 0 completes
# the forms the probe uses: `out %al,%dx` (EE), `in %dx,%al` (EC), their 32-bit forms (EF, ED:
# PCI configuration) and `rep outsb` (F3 6E: RCX bytes from RSI to port DX). `rdmsr` (0F 32)
# from ring 3 asks for CPUID (leaf EAX, subleaf ECX) run in ring 0: on hosts that run guest
# ring 3 natively, CPUID there answers with the host's values, not the VM's. `hlt` (F4) from ring 3 parks the CPU for good, with
# interrupts off, so that an idle probe costs the host nothing; with RAX = RESET_MAGIC it ends
# the VM instead. Anything else is a real fault.
gp_handler:
    testb $3, 16(%rsp)             # CS of the faulting code: ring 3?
    jz 9f
    pushq %rcx
    movq 16(%rsp), %rcx            # the faulting RIP
    cmpb $0xF4, (%rcx)
    jne 1f
    movq $RESET_MAGIC, %rcx
    cmpq %rcx, %rax
    je ring0_reset
    jmp ap_park
1:
    cmpb $0xEE, (%rcx)
    je 6f
    cmpb $0xEC, (%rcx)
    je 7f
    cmpw $0x6EF3, (%rcx)
    je 8f
    cmpb $0xEF, (%rcx)
    je 10f
    cmpb $0xED, (%rcx)
    je 11f
    cmpw $0x320F, (%rcx)
    je 12f
    popq %rcx
9:  pushq $13
    jmp isr_common
6:  popq %rcx
    outb %al, %dx
    addq $1, 8(%rsp)
    addq $8, %rsp                  # drop the error code
    iretq
7:  popq %rcx
    inb %dx, %al
    addq $1, 8(%rsp)
    addq $8, %rsp
    iretq
8:  popq %rcx
    rep outsb
    addq $2, 8(%rsp)
    addq $8, %rsp
    iretq
10: popq %rcx
    outl %eax, %dx
    addq $1, 8(%rsp)
    addq $8, %rsp
    iretq
11: popq %rcx
    inl %dx, %eax
    addq $1, 8(%rsp)
    addq $8, %rsp
    iretq
12: popq %rcx
    cpuid
    addq $2, 8(%rsp)
    addq $8, %rsp
    iretq

puts0:                             # %rsi: NUL-terminated string to COM1
    movw $0x3f8, %dx
2:  movb (%rsi), %al
    testb %al, %al
    jz 3f
    outb %al, %dx
    incq %rsi
    jmp 2b
3:  ret

puthex0:                           # %rax as 16 hex digits to COM1
    movw $0x3f8, %dx
    movq %rax, %rsi
    movl $16, %ecx
4:  rolq $4, %rsi
    movl %esi, %eax
    andl $15, %eax
    cmpb $10, %al
    jb 5f
    addb $39, %al
5:  addb $48, %al
    outb %al, %dx
    decl %ecx
    jnz 4b
    ret

    .section .isr_stubs, "ax"
    .set vector, 0
    .rept 256
    .balign 16
    .if vector == 13
    jmp gp_handler
    .elseif (vector == 8) || ((vector >= 10) && (vector <= 14)) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    .else
    pushq $0                       # vectors without an error code get a zero one
    .endif
    pushq $vector
    jmp isr_common
    .set vector, vector + 1
    .endr

# ------------------------------------------------------------------ data
    .section .rodata.boot, "a"
msg_exception: .asciz "\nPROBE FAIL exception vector="
msg_error:     .asciz " error="
msg_rip:       .asciz " rip="
msg_cs:        .asciz " cs="
msg_cr2:       .asciz " cr2="

    .section .data.boot, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x7               # present, writable, user
    .fill 511, 8, 0
pdpt:
    .set dir, 0
    .rept 8
    .quad pd + dir * 4096 + 0x7
    .set dir, dir + 1
    .endr
    .fill 504, 8, 0
pd:                                # the first 8 GiB (hotplugged memory lies above 4 GiB),
    .set page, 0                   # identity-mapped in 2 MiB user pages
    .rept 4096
    .quad (page << 21) | 0x87      # present, writable, user, 2 MiB
    .set page, page + 1
    .endr

    .balign 16
    .globl gdt, gdt_end
gdt:
    .quad 0
    .quad 0x00af9a000000ffff       # 0x08 ring-0 code, 64-bit
    .quad 0x00cf92000000ffff       # 0x10 ring-0 data
    .quad 0x00cff2000000ffff       # 0x18 ring-3 data
    .quad 0x00affa000000ffff       # 0x20 ring-3 code, 64-bit
    .word 103, TSS0_B0             # 0x28 the BSP's TSS
    .byte TSS0_B2, 0x89, 0x00, TSS0_B3
    .long 0, 0
    .globl gdt_ap_tss
gdt_ap_tss:                        # 0x38.. the APs' TSS descriptors, filled by ring 3
    .fill MAX_APS * 16, 1, 0
gdt_end:

    .balign 16
    .word 0, 0, 0
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt

    .balign 16
    .word 0, 0, 0
idtr:
    .word 256 * 16 - 1
    .quad idt
    .balign 16
    .word 0, 0, 0
idtr_null:
    .word 0
    .quad 0

    .balign 16
idt:
    .set vector, 0
    .rept 256
    .word ISR_LO + 16 * vector
    .word KCODE
    .byte 0, 0x8E                  # present, DPL 0, 64-bit interrupt gate
    .word ISR_HI
    .long 0, 0
    .set vector, vector + 1
    .endr

    .balign 16
    .globl tss0
tss0:
    .long 0
    .quad stack0_top               # RSP0
    .fill 88, 1, 0
    .word 0, 104                   # no I/O permission bitmap

    .globl ap_boot_records, ap_next_slot
    .balign 16
ap_boot_records:                   # per AP: ring-0 stack top, ring-3 stack top
    .fill MAX_APS * 16, 1, 0
ap_next_slot:
    .long 0

    .section .bss.boot, "aw", @nobits
    .balign 4096
    .space 16384
stack0_top:
    .space 65536
stack3_top:
