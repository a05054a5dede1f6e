; NVSHMEM device calls in a form Triton's extern_elementwise can call (kernels/nvshmem.py).
;
; extern_elementwise takes no pointer arguments and no void results, so each wrapper takes addresses as
; i64 and returns an i32 nobody reads. Linked together with libnvshmem_device_sm_XX.bc (nvidia-nvshmem wheel)
; through the `extern_libs` compile option; the module then needs nvshmem's cumodule_init before its
; first launch. Called from scalar Triton code, every thread of the program makes the call with the same
; arguments, which is what the `_block` variants require; a per-thread call has to pick one thread itself.
;
; Which threads call what:
;   putmem_signal_block  every thread: the _block variant is collective over the block (the threads share
;                        the copy, and the signal is written once).
;   putmem_block         every thread, as putmem_signal_block, without a signal (a later quiet + signal_set
;                        publishes the bytes).
;   signal_set           thread (0, 0, 0) only: nvshmemx_signal_op is one remote write (a P2P store, or an
;                        atomic over the network) per calling thread; from every thread it would be 256 of them.
;   quiet                every thread: NVSHMEM's device quiet completes and orders the calling thread's own
;                        operations (a membar.sys for P2P peers, nvshmemi_transfer_quiet<thread> otherwise), and in
;                        putmem_signal_block's P2P path every thread stored part of the rows. It runs once per
;                        program per launch, so the redundant calls cost little.

declare void @nvshmemx_putmem_signal_nbi_block(ptr, ptr, i64, ptr, i64, i32, i32)
declare void @nvshmemx_putmem_nbi_block(ptr, ptr, i64, i32)
declare void @nvshmemx_signal_op(ptr, i64, i32, i32)
declare void @nvshmem_quiet()
declare i32 @llvm.nvvm.read.ptx.sreg.tid.x()
declare i32 @llvm.nvvm.read.ptx.sreg.tid.y()
declare i32 @llvm.nvvm.read.ptx.sreg.tid.z()

; NVSHMEM_SIGNAL_SET (device_host_transport/nvshmem_common_transport.h)
@flashmoe_signal_set_op = private constant i32 9

define i32 @flashmoe_putmem_signal_block(i64 %dst, i64 %src, i64 %nbytes, i64 %sig, i64 %value, i32 %pe) noinline {
  %d = inttoptr i64 %dst to ptr
  %s = inttoptr i64 %src to ptr
  %g = inttoptr i64 %sig to ptr
  %op = load i32, ptr @flashmoe_signal_set_op
  call void @nvshmemx_putmem_signal_nbi_block(ptr %d, ptr %s, i64 %nbytes, ptr %g, i64 %value, i32 %op, i32 %pe)
  ret i32 0
}

define i32 @flashmoe_putmem_block(i64 %dst, i64 %src, i64 %nbytes, i32 %pe) noinline {
  %d = inttoptr i64 %dst to ptr
  %s = inttoptr i64 %src to ptr
  call void @nvshmemx_putmem_nbi_block(ptr %d, ptr %s, i64 %nbytes, i32 %pe)
  ret i32 0
}

; The guard is this function's own branch: noinline keeps the function whole in the PTX, where the compile gate
; finds it (thread0_only in flashmoe_py/triton_compile_check.py); tests/test_nvshmem_shim.py checks this IR.
define i32 @flashmoe_signal_set(i64 %sig, i64 %value, i32 %pe) noinline {
entry:
  %tx = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %ty = call i32 @llvm.nvvm.read.ptx.sreg.tid.y()
  %tz = call i32 @llvm.nvvm.read.ptx.sreg.tid.z()
  %txy = or i32 %tx, %ty
  %txyz = or i32 %txy, %tz
  %first = icmp eq i32 %txyz, 0
  br i1 %first, label %signal, label %done

signal:
  %g = inttoptr i64 %sig to ptr
  %op = load i32, ptr @flashmoe_signal_set_op
  call void @nvshmemx_signal_op(ptr %g, i64 %value, i32 %op, i32 %pe)
  br label %done

done:
  ret i32 0
}

define i32 @flashmoe_quiet() {
  call void @nvshmem_quiet()
  ret i32 0
}
