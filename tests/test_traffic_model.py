"""The compile gate's HBM traffic estimate (flashmoe_py.traffic_model) on cases computable by hand, and its reading
of the triton backend's real GEMM launches (planned on meta tensors, whatever their launch order is)."""

from __future__ import annotations

import pytest
import torch

from flashmoe_py import traffic_model as tm
from flashmoe_py.config import MoEConfig


def _grid_problem(tiles_m: int, tiles_n: int, a: int, b: int, c: int = 0, group_m=None) -> tm.Problem:
    """One expert's rows GEMM: every A tile `a` bytes, every B tile `b`, every program writes `c`."""
    return tm.Problem("probe", "rows", tiles_m, tiles_n, group_m, 1, [a] * tiles_m, [[b] * tiles_n],
                      [[c] * tiles_n for _ in range(tiles_m)], [[0] * tiles_n for _ in range(tiles_m)], [0] * tiles_m)


def test_grouped_order_covers_every_tile_once_and_spans_row_and_column_major():
    for tiles_m, tiles_n, g in ((5, 3, 2), (7, 4, 3), (4, 4, 8)):
        order = list(tm.grouped(tiles_m, tiles_n, g))
        assert sorted(order) == [(m, n) for m in range(tiles_m) for n in range(tiles_n)], (tiles_m, tiles_n, g)
    assert list(tm.grouped(2, 3, 1)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]  # row-major
    assert list(tm.grouped(2, 3, 2)) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]  # column-major
    # 5 row tiles in groups of 2: the last group is the single row tile 4
    assert list(tm.grouped(5, 2, 2))[:6] == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0)]
    assert list(tm.grouped(5, 2, 2))[-2:] == [(4, 0), (4, 1)]


@pytest.mark.parametrize("group_m", [1, 2, 4])
def test_one_wave_that_holds_everything_reads_every_tile_once(group_m):
    prob = _grid_problem(4, 3, a=100, b=70, c=9)
    once = prob.once()
    assert once == {"a": 400, "b": 210, "c": 108}
    assert tm.simulate(prob, resident=12, l2_bytes=10**9, group_m=group_m) == sum(once.values())
    # one program at a time but an L2 that holds every tile: the same
    assert tm.simulate(prob, resident=1, l2_bytes=10**9, group_m=group_m) == sum(once.values())


def test_an_l2_of_one_a_and_one_b_tile_rereads_what_the_order_does_not_reuse():
    tiles_m, tiles_n, a, b = 4, 3, 100, 70
    prob = _grid_problem(tiles_m, tiles_n, a, b)
    # column-major (row tiles fastest): A re-read for every column tile, each B tile read once
    assert tm.simulate(prob, 1, a + b, group_m=tiles_m) == tiles_n * tiles_m * a + tiles_n * b
    # row-major: each A tile read once, B re-read for every row tile
    assert tm.simulate(prob, 1, a + b, group_m=1) == tiles_m * a + tiles_m * tiles_n * b
    # waves of two programs (two row tiles of one column tile): the same
    assert tm.simulate(prob, 2, a + b, group_m=tiles_m) == tiles_n * tiles_m * a + tiles_n * b


def test_written_bytes_take_room_in_l2():
    # An L2 that holds every A and B tile (row-major order, one program at a time) keeps B across row tiles; it no
    # longer does once every program also writes a tile's worth of C.
    prob, fits = _grid_problem(2, 3, a=10, b=50), 2 * 10 + 3 * 50
    assert tm.simulate(prob, 1, fits, group_m=1) == 2 * 10 + 3 * 50
    written = _grid_problem(2, 3, a=10, b=50, c=50)
    assert tm.simulate(written, 1, fits, group_m=1) == 2 * 10 + 2 * 3 * 50 + 6 * 50


def _bench_launches(target="sm_90", **overrides):
    from flashmoe_py.triton_backend import plan_launches

    name, fields, tokens, backward = tm.SHAPES[0]
    return fields, tokens, plan_launches(MoEConfig(**fields, **overrides), torch.bfloat16, tokens, target, backward)


@pytest.mark.parametrize("bias", [False, True])
def test_every_gemm_launch_is_modelled_and_once_is_the_tensors_bytes(bias):
    fields, tokens, launches = _bench_launches(bias=bias)
    rows = tokens * fields["top_k"]
    gemms = [launch for launch in launches if "config" in launch.tags]
    assert {launch.kernel.fn.__name__ for launch in gemms} == set(tm.MODELS), "a GEMM kernel without a model"
    for launch in gemms:
        prob = tm.problem(launch)  # raises when the grid is not the tiles the model derives
        args = launch.args
        spec = tm.MODELS[launch.kernel.fn.__name__]
        once = prob.once()
        a, b = args[spec["a"]], args[spec["b"]]
        if spec["kind"] == "rows":
            assert once["a"] == rows * int(args[spec["k"]]) * a.element_size(), launch.name  # gathered rows
            written = [args[c] for c in spec["c"] + spec["extra"] if args.get(c) is not None]
            assert once["c"] == sum(rows * t.shape[1] * t.element_size() for t in written), launch.name
        else:
            assert once["a"] == rows * a.shape[1] * a.element_size(), launch.name
            assert once["c"] == args["dw_ptr"].numel() * args["dw_ptr"].element_size(), launch.name
        b_once = b.numel() * b.element_size() if spec["kind"] == "rows" else rows * b.shape[1] * b.element_size()
        assert once["b"] == b_once, launch.name


def test_estimate_of_the_bench_shape_is_never_below_once_and_the_plain_orders_differ():
    _, _, launches = _bench_launches()
    by_name = {}
    for launch in launches:
        est = tm.estimate(launch, "sm_90", 2)
        if est is None:
            continue
        by_name[launch.name] = est
        for total in (est.launched, est.row_major, est.column_major):
            assert total >= est.once_total * 0.999, (launch.name, total, est.once)
    # down at T=16384: A (h, 277 MB) is far larger than L2, so row tiles fastest re-reads it for each of the column
    # tiles (8 of 256 columns at H=2048: about 2.9x of once), while one expert's w_down (5.8 MB) stays in L2
    # across its row tiles in row-major order.
    down = by_name["down[scaled]"]
    assert down.column_major > 2.5 * down.once_total and down.row_major < 1.1 * down.once_total, down
