"""Device helpers shared by the kernels: expert tile lookup, activations and their derivatives.

Every helper works on fp32 or fp64 values; kernels upcast loads to their accumulator type first.

Activations (DESIGN §2.5) come as two constexprs, ACT and GATED. Plain (GATED=False): ACT names act(z), one of "silu",
"gelu" (exact erf), "gelu_tanh" (tanh approximation), "relu", "relu2". Gated: ACT is either the gate function of
act(gate) * up ("silu": swiglu, "gelu": geglu, "gelu_tanh": geglu_tanh) or the key of a parameterised gated
activation, its parameters in the string (`MoEConfig.activation_key`: "swiglu_oai:<alpha>:<limit>",
"swiglu_clamped:<limit>", "swiglu_softcap:<gate cap>:<up cap>"), read at compile time by `act_name` / `act_param`: the
parameters are compile-time constants of the kernel variant, materialised in the accumulator's dtype (fp64 stays
exact). A local holding one must be annotated `tl.constexpr`: the interpreter turns an unannotated one into an fp32
scalar.
"""

import triton
import triton.language as tl

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2), for the exact erf gelu
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 * pi), gelu's derivative
_TWO_SQRT_2_PI = tl.constexpr(1.5957691216057308)  # 2 sqrt(2 / pi), the tanh gelu's inner scale doubled
_GELU_CUBIC = tl.constexpr(0.044715)  # the tanh gelu's cubic coefficient


@triton.jit
def expert_tile(pid_m, counts_ptr, E, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Map grouped-GEMM tile `pid_m` to (expert e, first sorted row of the tile, rows left in e from there).

    counts_ptr [E] int32: rows per expert, experts stored back to back. Expert e owns cdiv(counts[e], BLOCK_M)
    consecutive tiles; tiles past the last expert give e >= E and the caller exits. Computed from the counts
    in every program, so the host never reads them (grids are sized from an upper bound).
    """
    ex = tl.arange(0, E_PAD)
    n = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    tiles = (n + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    e = tl.sum((ends <= pid_m).to(tl.int32), 0)
    before = ex < e
    first_tile = tl.sum(tl.where(before, tiles, 0), 0)
    first_row = tl.sum(tl.where(before, n, 0), 0)
    n_e = tl.sum(tl.where(ex == e, n, 0), 0)
    local = (pid_m - first_tile) * BLOCK_M
    return e, first_row + local, n_e - local


@triton.jit
def expert_rows(e, counts_ptr, E, E_PAD: tl.constexpr):
    """(first sorted row, row count) of expert e; counts_ptr [E] int32."""
    ex = tl.arange(0, E_PAD)
    n = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    return tl.sum(tl.where(ex < e, n, 0), 0), tl.sum(tl.where(ex == e, n, 0), 0)


@triton.constexpr_function
def act_name(act):
    """The activation's name: the key up to its first ':' (compile time)."""
    return str(act).split(":")[0]


@triton.constexpr_function
def act_has_params(act):
    """Whether ACT is a parameterised activation's key (compile time)."""
    return ":" in str(act)


@triton.constexpr_function
def act_param(act, i):
    """Parameter i of an activation key "name:p0:p1" as a Python float (compile time)."""
    return float(str(act).split(":")[1 + i])


@triton.jit
def _sigmoid(z):
    # Written out rather than tl.sigmoid so fp64 stays fp64; exp overflow gives the right limits (0 and 1).
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z2):
    """tanh(z) given z2 = 2z, as 1 - 2 / (exp(2z) + 1): one exp, one division, exact limits at +-inf (exp
    overflows to inf or underflows to 0), NaN stays NaN; absolute error a few ulp of 1 (so relative error grows
    as |z| falls below 1). Written out: libdevice's tanh does not run under the interpreter."""
    return 1.0 - 2.0 / (tl.exp(z2) + 1.0)


@triton.jit
def _clamp_above(z, limit: tl.constexpr):
    """min(z, limit), NaN kept (torch.clamp(max=)): one min.NaN on the GPU. The limit enters as a tensor of z's dtype
    (a binary op materialises it there): tl.minimum would take a Python float as fp32 (Triton 3.6)."""
    return tl.minimum(z, tl.zeros_like(z) + limit, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clamp_sym(z, limit: tl.constexpr):
    """clamp(z, -limit, limit), NaN kept."""
    lim = tl.zeros_like(z) + limit
    return tl.maximum(tl.minimum(z, lim, propagate_nan=tl.PropagateNan.ALL), -lim, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    """ACT in {"silu", "gelu" (exact erf), "gelu_tanh", "relu", "relu2"} applied to z (fp32/fp64)."""
    if ACT == "silu":
        y = z * _sigmoid(z)
    elif ACT == "gelu":
        y = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACT == "gelu_tanh":
        # 0.5 (1 + tanh(a)) = sigmoid(2a): no cancellation where tanh(a) nears -1 (z below about -3), where
        # 1 + tanh(a) would lose every digit in fp32.
        y = z * _sigmoid((z + z * z * z * _GELU_CUBIC) * _TWO_SQRT_2_PI)
    elif ACT == "relu2":
        r = tl.where(z < 0, 0.0, z)
        y = r * r
    else:
        # where(z < 0, 0, z) keeps NaN as NaN, like torch.relu (a max(z, 0) would drop it).
        y = tl.where(z < 0, 0.0, z)
    return y


@triton.jit
def act_grad(z, ACT: tl.constexpr):
    """d act(z) / dz, matching PyTorch's backward (relu: 1 where z > 0, else 0)."""
    if ACT == "silu":
        s = _sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == "gelu":
        d = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACT == "gelu_tanh":
        # d/dz z s(2a) = s + z 2 s (1 - s) a', s = sigmoid(2a), 2a' = 2 sqrt(2/pi) (1 + 3 * 0.044715 z^2).
        s = _sigmoid((z + z * z * z * _GELU_CUBIC) * _TWO_SQRT_2_PI)
        d = s + z * s * (1.0 - s) * ((z * z * (3.0 * _GELU_CUBIC) + 1.0) * _TWO_SQRT_2_PI)
    elif ACT == "relu2":
        d = 2.0 * tl.where(z > 0, z, 0.0)
    else:
        d = tl.where(z > 0, 1.0, 0.0)
    return d


@triton.jit
def glu_fwd(g, u, ACT: tl.constexpr):
    """A gated activation h(gate g, up u), elementwise (see the module docstring for ACT)."""
    if act_name(ACT) == "swiglu_oai":
        gc = _clamp_above(g, act_param(ACT, 1))
        h = (_clamp_sym(u, act_param(ACT, 1)) + 1.0) * (gc * _sigmoid(gc * act_param(ACT, 0)))
    elif act_name(ACT) == "swiglu_clamped":
        gc = _clamp_above(g, act_param(ACT, 0))
        h = gc * _sigmoid(gc) * _clamp_sym(u, act_param(ACT, 0))
    elif act_name(ACT) == "swiglu_softcap":
        # c tanh(z / c) = c - 2c / (exp(2z / c) + 1) (see _tanh) with its constants folded, and sigmoid(g) as one
        # division at the end: of the algebraically equal forms tried, the only one that neither the persistent
        # kernel (sm_90, 16-bit: 255 registers taken) nor the up kernel (sm_80, 16-bit: ptxas keeps it at 128)
        # spills with; `make compile-check` has both.
        e = tl.exp(-g)
        a = act_param(ACT, 0) - (2.0 * act_param(ACT, 0)) / (tl.exp(g * (2.0 / act_param(ACT, 0))) + 1.0)
        b = act_param(ACT, 1) - (2.0 * act_param(ACT, 1)) / (tl.exp(u * (2.0 / act_param(ACT, 1))) + 1.0)
        h = (a * b) / (1.0 + e)
    else:
        h = act_fwd(g, ACT) * u
    return h


@triton.jit
def glu_grad(g, u, ACT: tl.constexpr):
    """(dh/dg, dh/du) of glu_fwd, matching PyTorch's backward: a clamp passes the gradient where its input lies
    within the bounds, bounds included (torch.clamp), and blocks it outside."""
    if act_name(ACT) == "swiglu_oai":
        # A clamp passes the gradient exactly where it left its input unchanged (NaN: nowhere, as in torch).
        gc = _clamp_above(g, act_param(ACT, 1))
        uc = _clamp_sym(u, act_param(ACT, 1))
        s = _sigmoid(gc * act_param(ACT, 0))
        glu = gc * s
        dg = tl.where(gc == g, (uc + 1.0) * (s + act_param(ACT, 0) * glu * (1.0 - s)), 0.0)
        du = tl.where(uc == u, glu, 0.0)
    elif act_name(ACT) == "swiglu_clamped":
        gc = _clamp_above(g, act_param(ACT, 0))
        uc = _clamp_sym(u, act_param(ACT, 0))
        s = _sigmoid(gc)
        dg = tl.where(gc == g, uc * s * (1.0 + gc * (1.0 - s)), 0.0)
        du = tl.where(uc == u, gc * s, 0.0)
    elif act_name(ACT) == "swiglu_softcap":
        tg = _tanh(g * (2.0 / act_param(ACT, 0)))
        tu = _tanh(u * (2.0 / act_param(ACT, 1)))
        s = _sigmoid(g)
        a = tg * act_param(ACT, 0)  # the capped gate factor
        b = tu * act_param(ACT, 1)  # the capped up
        dg = ((1.0 - tg * tg) * s + a * s * (1.0 - s)) * b
        du = a * s * (1.0 - tu * tu)
    else:
        dg = act_grad(g, ACT) * u
        du = act_fwd(g, ACT)
    return dg, du


@triton.jit
def expert_act(g, u, ACT: tl.constexpr, GATED: tl.constexpr):
    """The expert activation on a tile: glu_fwd(g, u) when GATED, else act_fwd(g) (u unused)."""
    if GATED:
        h = glu_fwd(g, u, ACT)
    else:
        h = act_fwd(g, ACT)
    return h
