"""An estimate, not a measurement, of the HBM bytes each grouped-GEMM launch of the triton backend moves: the compile
gate (`make compile-check`) prints it for SHAPES, beside the bytes of reading A and B and writing C once.

What a launch is, taken from its Launch record (triton_backend.plan_launches on meta tensors): the tensors and their
shapes and dtypes, the tile shape (BLOCK_M, BLOCK_N), the grid and the launch order. Routing is uniform: each of
the E experts gets R / E of the R = T * k sorted rows (the remainder to the first experts).

  rows GEMMs (up, down, dx, dh)  programs cover (row tile, column tile); row tiles are numbered expert by expert,
      cdiv(R / E, BLOCK_M) per expert. A "tile" the model tracks is a whole K panel: A[row tile] (rows x K,
      gathered rows included: a token's row read by k experts counts k times, as the kernel reads it) and B[expert,
      column tile] (K x the tile's share of the expert's weight columns, gate and up together for the up GEMM).
      C: the tile's share of every output (h and pre for up, dpre for dh); dh also reads pre in its epilogue, once.
  expert GEMMs (dW)  programs cover (expert, row tile of dW[e], column tile); A[expert, row tile] is the expert's
      R / E rows x BLOCK_M columns of A, B[expert, column tile] likewise; with a bias, when the grid says so, each
      expert's tiles are followed by one program per column tile that reads B[expert, column tile] (db's sums).
Launch order: the program id decodes to a tile as the kernel does it. With a GROUP_M constexpr: grouped order
(`grouped`: GROUP_M row tiles, walked for column tile 0, then column tile 1, ...; 1 is row-major), experts
slowest for dW. Without one (the 2-D grids before grouping): row tiles fastest (column-major) for the rows GEMMs,
row-major within each expert for dW. Surplus programs (the grid is sized from an upper bound on the row tiles)
exit at once and are dropped.

The cache model: programs run in waves of P = CTAs per SM (from the compiled kernel's registers and shared memory,
compile_structure.ctas_per_sm) x SMs, consecutive in launch order. A wave touches the distinct A and B tiles of
its programs (programs of one wave sharing a tile read it once: they run side by side over K); a tile is read
from HBM unless it is in an LRU cache of L2 bytes of whole tiles, which also holds the C bytes each wave writes
(write-back: they take room, are never read again). C is written once; the epilogue reads are read once.

Limits: a real GPU starts a program whenever one ends, not in waves; a wave's programs are not in lockstep over K,
L2 is not LRU over whole panels (H100's is two partitions, a line may live in both), the routing is not uniform and
some hits in the up GEMM (a token's row shared by its k experts in one wave) are not counted; the small
reads (routing weights, indices, biases) and the atomic combine's read-modify-write are left out. It ranks launch
orders and tile shapes; it does not predict a kernel's time.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

# SMs and L2 bytes of the part each target stands for (H100 SXM / H200: 132 SMs, 50 MB; A100: 108 SMs, 40 MB).
DEVICES = {"sm_90": ("H100", 132, 50 * 2**20), "sm_80": ("A100", 108, 40 * 2**20)}

# (name, MoEConfig fields, tokens, backward): the three shapes, all bf16.
SHAPES = (
    ("T16k", dict(hidden_size=2048, ffn_hidden_size=1408, num_experts=64, top_k=6), 16384, True),
    ("decode256", dict(hidden_size=2048, ffn_hidden_size=1408, num_experts=64, top_k=6), 256, False),
    ("mixtral", dict(hidden_size=4096, ffn_hidden_size=14336, num_experts=8, top_k=2), 16384, True),
)

# Kernel function -> which launch arguments are A, B (and its reduction length K), the outputs, and the tensors the
# epilogue reads once. "rows": tiles of sorted rows x columns; "experts": dW, tiles of dW[e] reduced over e's rows.
MODELS = {
    "up_kernel": dict(kind="rows", a="x_ptr", b="w_ptr", k="H", c=("h_ptr", "pre_ptr"), extra=()),
    "rows_gemm_kernel": dict(kind="rows", a="a_ptr", b="b_ptr", k="K", c=("out_ptr",), extra=()),
    "act_grad_kernel": dict(kind="rows", a="g_ptr", b="wd_ptr", k="H", c=("dpre_ptr",), extra=("pre_ptr",)),
    "weight_grad_kernel": dict(kind="experts", a="a_ptr", b="b_ptr", m="M", n="N", c=("dw_ptr",), extra=()),
}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split(total: int, parts: int) -> list[int]:
    """Widths of `parts` column tiles over `total` columns (equal tiles, the last one partial)."""
    width = _cdiv(total, parts)
    return [max(0, min(width, total - i * width)) for i in range(parts)]


def grouped(tiles_m: int, tiles_n: int, group_m: int):
    """(row tile, column tile) of each program id in grouped launch order (the Triton matmul tutorial's): ids
    GROUP_M * tiles_n * g onwards cover row tiles [GROUP_M * g, GROUP_M * (g + 1)), walked for column 0, then 1..."""
    per_group = group_m * tiles_n
    for pid in range(tiles_m * tiles_n):
        first = (pid // per_group) * group_m
        size = min(tiles_m - first, group_m)
        local = pid % per_group
        yield first + local % size, local // size


@dataclass
class Problem:
    """One GEMM launch as the model sees it. A tile's key names what it reads; bytes are per tile."""

    name: str
    kind: str  # "rows" or "experts"
    tiles_m: int  # rows: all experts' row tiles; experts: row tiles of one dW[e]
    tiles_n: int
    group_m: int | None  # None: the order before grouping (see the module docstring)
    experts: int
    a_bytes: list  # rows: per row tile; experts: [e][row tile]
    b_bytes: list  # rows: [e][column tile]; experts: [e][column tile]
    c_bytes: list  # rows: [row tile][column tile] (outputs and epilogue reads); experts: [e][m][n] via c_tile
    extra_bytes: list  # like c_bytes: epilogue reads
    tile_expert: list  # rows: expert of each row tile
    b_sums: bool = False  # experts: after each expert's tiles, one program per column tile reads B (db's sums)

    def order(self, group_m: int | None = "launch"):
        """Programs in launch order as (A key, B key, (m, n) or (e, m, n)); group_m overrides the launch's."""
        g = self.group_m if group_m == "launch" else group_m
        if self.kind == "rows":
            g = self.tiles_m if g is None else g
            for m, n in grouped(self.tiles_m, self.tiles_n, g):
                e = self.tile_expert[m]
                yield ("A", m), ("B", e, n), (m, n)
        else:
            g = 1 if g is None else g
            for e in range(self.experts):
                for m, n in grouped(self.tiles_m, self.tiles_n, g):
                    yield ("A", e, m), ("B", e, n), (e, m, n)
                if self.b_sums:
                    for n in range(self.tiles_n):
                        yield None, ("B", e, n), None

    def tile_bytes(self, key) -> int:
        if key[0] == "A":
            return self.a_bytes[key[1]] if self.kind == "rows" else self.a_bytes[key[1]][key[2]]
        return self.b_bytes[key[1]][key[2]]

    def out_bytes(self, where) -> tuple[int, int]:
        """(C bytes written, epilogue bytes read) of one program."""
        if where is None:  # a column-sum program: its output is a row of db, left out
            return 0, 0
        if self.kind == "rows":
            m, n = where
            return self.c_bytes[m][n], self.extra_bytes[m][n]
        e, m, n = where
        return self.c_bytes[m][n], 0

    def once(self) -> dict:
        """Bytes of reading every A and B tile once and writing C once (epilogue reads under C: 'c')."""
        if self.kind == "rows":
            a = sum(self.a_bytes)
            c = sum(map(sum, self.c_bytes)) + sum(map(sum, self.extra_bytes))
        else:
            a = sum(map(sum, self.a_bytes))
            c = sum(map(sum, self.c_bytes)) * self.experts
        return {"a": a, "b": sum(map(sum, self.b_bytes)), "c": c}


def _rows_per_expert(rows: int, experts: int) -> list[int]:
    base, extra = divmod(rows, experts)
    return [base + (e < extra) for e in range(experts)]


def problem(launch) -> Problem | None:
    """The model of a GEMM Launch (None for kernels it does not model). Raises ValueError when the launch's grid
    does not match the tiles the model derives (the model is out of date with the kernel)."""
    kernel = getattr(getattr(launch.kernel, "fn", None), "__name__", None)
    spec = MODELS.get(kernel)
    if spec is None:
        return None
    args, cx = launch.args, launch.constexprs
    a, b = args[spec["a"]], args[spec["b"]]
    experts = int(args["E"])
    order = args.get("order_ptr")
    rows = int(order.shape[0]) if order is not None else int(a.shape[0])
    per_expert = _rows_per_expert(rows, experts)
    bm, bn = cx["BLOCK_M"], cx["BLOCK_N"]
    group_m = cx.get("GROUP_M")
    programs = 1
    for g in launch.grid:
        programs *= int(g)
    outputs = [args[c] for c in spec["c"] if args.get(c) is not None]
    extras = [args[c] for c in spec["extra"] if args.get(c) is not None]
    if spec["kind"] == "rows":
        k = int(args[spec["k"]])
        bound = min(rows, (rows + experts * (bm - 1)) // bm)  # triton_backend._m_tiles: the grid's row tiles
        tiles_n = int(launch.grid[1]) if len(launch.grid) > 1 and int(launch.grid[1]) > 1 else programs // bound
        if tiles_n < 1 or bound * tiles_n != programs:
            raise ValueError(f"{launch.name}: grid {launch.grid} is not {bound} row tiles x column tiles")
        tile_rows, tile_expert = [], []
        for e, n_e in enumerate(per_expert):
            for r0 in range(0, n_e, bm):
                tile_rows.append(min(bm, n_e - r0))
                tile_expert.append(e)
        b_cols = b.numel() // experts // k
        b_item = b.element_size()
        b_tile = [k * w * b_item for w in _split(b_cols, tiles_n)]
        c_row = [sum(w * t.element_size() for t in outputs for w in [_split(t.shape[1], tiles_n)[n]])
                 for n in range(tiles_n)]
        x_row = [sum(w * t.element_size() for t in extras for w in [_split(t.shape[1], tiles_n)[n]])
                 for n in range(tiles_n)]
        return Problem(launch.name, "rows", len(tile_rows), tiles_n, group_m, experts,
                       [r * k * a.element_size() for r in tile_rows], [b_tile[:] for _ in range(experts)],
                       [[r * c for c in c_row] for r in tile_rows], [[r * x for x in x_row] for r in tile_rows],
                       tile_expert)
    m_dim, n_dim = int(args[spec["m"]]), int(args[spec["n"]])
    tiles_m, tiles_n = _cdiv(m_dim, bm), _cdiv(n_dim, bn)
    # With a bias each expert's tiles may be followed by tiles_n programs summing B's columns (db).
    b_sums = bool(cx.get("HAS_BIAS")) and programs == experts * (tiles_m + 1) * tiles_n
    if programs != experts * tiles_m * tiles_n and not b_sums:
        raise ValueError(f"{launch.name}: grid {launch.grid} is not {experts} experts x {tiles_m} x {tiles_n} tiles")
    m_w, n_w = _split(m_dim, tiles_m), _split(n_dim, tiles_n)
    a_item, b_item = a.element_size(), b.element_size()
    c_item = sum(t.element_size() for t in outputs)
    return Problem(launch.name, "experts", tiles_m, tiles_n, group_m, experts,
                   [[r * w * a_item for w in m_w] for r in per_expert],
                   [[r * w * b_item for w in n_w] for r in per_expert],
                   [[mw * nw * c_item for nw in n_w] for mw in m_w], [], [], b_sums)


def simulate(prob: Problem, resident: int, l2_bytes: int, group_m: int | None = "launch") -> int:
    """Estimated HBM bytes of the launch: A and B tiles read on L2 misses, C written once, epilogue reads once."""
    cache: OrderedDict = OrderedDict()
    used = total = 0
    wave: dict = {}
    out = count = waves = 0

    def flush():
        nonlocal used, total, out, waves
        for key, nbytes in wave.items():
            if key in cache:
                cache.move_to_end(key)
            else:
                total += nbytes
                cache[key] = nbytes
                used += nbytes
        cache[("out", waves)] = out  # written (and epilogue-read) bytes take room in L2 too
        used += out
        total += out
        while used > l2_bytes and cache:
            used -= cache.popitem(last=False)[1]
        wave.clear()
        out = 0
        waves += 1

    for a_key, b_key, where in prob.order(group_m):
        if a_key is not None and a_key not in wave:
            wave[a_key] = prob.tile_bytes(a_key)
        if b_key not in wave:
            wave[b_key] = prob.tile_bytes(b_key)
        c, x = prob.out_bytes(where)
        out += c + x
        count += 1
        if count == resident:
            flush()
            count = 0
    if count:
        flush()
    return total


@dataclass
class Estimate:
    name: str
    programs: int
    resident: int
    group_m: int | None
    once: dict
    launched: int
    row_major: int
    column_major: int

    @property
    def once_total(self) -> int:
        return sum(self.once.values())


def estimate(launch, target: str, ctas_per_sm: int) -> Estimate | None:
    """The estimate of one launch on `target`'s part with `ctas_per_sm` of its programs per SM (None when the
    kernel is not a modelled GEMM)."""
    prob = problem(launch)
    if prob is None:
        return None
    _, sms, l2 = DEVICES[target]
    resident = max(1, ctas_per_sm) * sms
    results = {}
    for label, g in (("row_major", 1), ("column_major", prob.tiles_m)):
        results[label] = simulate(prob, resident, l2, g)
    launched_g = prob.group_m
    if launched_g is None:
        launched_g = prob.tiles_m if prob.kind == "rows" else 1
    same = {1: "row_major", prob.tiles_m: "column_major"}.get(launched_g)
    launched = results[same] if same else simulate(prob, resident, l2, launched_g)
    programs = prob.tiles_m * prob.tiles_n if prob.kind == "rows" else \
        prob.experts * (prob.tiles_m + prob.b_sums) * prob.tiles_n
    return Estimate(prob.name, programs, resident, prob.group_m, prob.once(), launched, results["row_major"],
                    results["column_major"])
