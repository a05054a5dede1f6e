"""NVSHMEM device functions callable from Triton kernels (DESIGN §6), through kernels/nvshmem_shim.ll.

Triton's `extern_elementwise` cannot pass pointers or return void, so the shim wraps each NVSHMEM call in a
function taking i64 addresses and returning an unused i32. A kernel that calls these must be compiled with
`extern_libs=extern_libs(arch)` (the shim plus the device bitcode of the nvidia-nvshmem wheel) and its
loaded module initialised with nvshmem4py's cumodule_init before it first runs (flashmoe_py.fused_backend
does both). Addresses are symmetric: this rank's address of the object, the call names the peer `pe`.
Called from scalar code, every thread of the program makes the call with identical arguments, which is
the contract of the `_block` variants; where NVSHMEM's function is per thread, the shim picks the threads:

  putmem_signal_block(dst, src, nbytes, sig, value, pe)  nvshmemx_putmem_signal_nbi_block, SIGNAL_SET:
                                                         nbytes from src to pe's dst, then pe's 64-bit
                                                         word sig = value once the bytes are there.
                                                         Every thread (collective over the block).
  putmem_block(dst, src, nbytes, pe)                     nvshmemx_putmem_nbi_block: the same without a signal;
                                                         a quiet, then a signal_set, publishes the bytes.
                                                         Every thread (collective over the block).
  signal_set(sig, value, pe)                             nvshmemx_signal_op(sig, value, SIGNAL_SET, pe), by
                                                         thread (0, 0, 0) alone: one remote write per
                                                         program, not one per thread. It orders nothing the
                                                         other threads wrote: a signal that publishes their
                                                         data needs a barrier first (the fused kernel's
                                                         signal_set calls publish empty packets).
  quiet()                                                nvshmem_quiet, by every thread: it completes the
                                                         calling thread's own operations (OpenSHMEM: quiet
                                                         orders memory stores of the calling thread only),
                                                         and every thread stored part of a _block put.

The compile gate checks the thread-0 guard in the PTX (triton_compile_check.thread0_only), and
tests/test_nvshmem_shim.py in the shim's IR.
"""

import glob
import importlib.util
import os

from triton.language import core

SHIM_NAME = "flashmoe_nvshmem_shim"
SHIM_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nvshmem_shim.ll")
_I32, _I64 = core.dtype("int32"), core.dtype("int64")


def device_bitcode(arch: int) -> str | None:
    """Path of the NVSHMEM device bitcode from the nvidia-nvshmem wheel: libnvshmem_device_sm_<N>.bc for the
    closest N not above `arch` (wheels from 3.7 on), else the single libnvshmem_device.bc (older wheels);
    None when the wheel is not installed."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    found, generic = {}, None
    for root in spec.submodule_search_locations:
        lib = os.path.join(root, "nvshmem", "lib")
        for path in glob.glob(os.path.join(lib, "libnvshmem_device_sm_*.bc")):
            sm = os.path.basename(path)[len("libnvshmem_device_sm_"):-len(".bc")]
            if sm.isdigit():
                found[int(sm)] = path
        if os.path.exists(os.path.join(lib, "libnvshmem_device.bc")):
            generic = os.path.join(lib, "libnvshmem_device.bc")
    usable = [sm for sm in found if sm <= arch]
    return found[max(usable)] if usable else generic


def extern_libs(arch: int) -> tuple:
    """The `extern_libs` compile option for a kernel calling these functions on sm_<arch>.

    The bitcode must be readable by the LLVM inside the installed Triton: nvidia-nvshmem-cu13 3.8 is built
    with clang 22, which Triton 3.6 cannot parse ("Failed to parse library"); 3.7 (clang 21) works from
    Triton 3.6 through 3.9, hence the pin in pyproject.toml."""
    bitcode = device_bitcode(arch)
    if bitcode is None:
        raise RuntimeError("the NVSHMEM device bitcode is missing: pip install 'nvidia-nvshmem-cu13<3.8'")
    return ((SHIM_NAME, SHIM_PATH), ("libnvshmem_device", bitcode))


@core.extern
def putmem_signal_block(dst, src, nbytes, sig, value, pe, _semantic=None):
    return core.extern_elementwise(SHIM_NAME, SHIM_PATH, [dst, src, nbytes, sig, value, pe],
                                   {(_I64, _I64, _I64, _I64, _I64, _I32): ("flashmoe_putmem_signal_block", _I32)},
                                   is_pure=False, _semantic=_semantic)


@core.extern
def putmem_block(dst, src, nbytes, pe, _semantic=None):
    return core.extern_elementwise(SHIM_NAME, SHIM_PATH, [dst, src, nbytes, pe],
                                   {(_I64, _I64, _I64, _I32): ("flashmoe_putmem_block", _I32)},
                                   is_pure=False, _semantic=_semantic)


@core.extern
def signal_set(sig, value, pe, _semantic=None):
    return core.extern_elementwise(SHIM_NAME, SHIM_PATH, [sig, value, pe],
                                   {(_I64, _I64, _I32): ("flashmoe_signal_set", _I32)},
                                   is_pure=False, _semantic=_semantic)


@core.extern
def quiet(_semantic=None):
    return core.extern_elementwise(SHIM_NAME, SHIM_PATH, [], {(): ("flashmoe_quiet", _I32)}, is_pure=False,
                                   _semantic=_semantic)
