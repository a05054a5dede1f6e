; NVSHMEM device calls in a form Triton's extern_elementwise can call (kernels/nvshmem.py).
;
; extern_elementwise takes no pointer arguments and no void results, so each wrapper takes addresses as
; i64 and returns an i32 nobody reads. Linked together with libnvshmem_device_sm_XX.bc (nvidia-nvshmem wheel)
; through the `extern_libs` compile option; the module then needs nvshmem's cumodule_init before its
; first launch. Called from scalar Triton code, every thread of the program makes the call with the same
; arguments, which is what the `_block` variants require.

declare void @nvshmemx_putmem_signal_nbi_block(ptr, ptr, i64, ptr, i64, i32, i32)
declare void @nvshmemx_signal_op(ptr, i64, i32, i32)
declare void @nvshmem_quiet()

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

define i32 @flashmoe_signal_set(i64 %sig, i64 %value, i32 %pe) noinline {
  %g = inttoptr i64 %sig to ptr
  %op = load i32, ptr @flashmoe_signal_set_op
  call void @nvshmemx_signal_op(ptr %g, i64 %value, i32 %op, i32 %pe)
  ret i32 0
}

define i32 @flashmoe_quiet() {
  call void @nvshmem_quiet()
  ret i32 0
}
