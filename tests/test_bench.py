"""The benchmark CLI: argument parsing, presets, the result schema, the FLOP/byte/wire counting formulas
(hand-computed), the correctness gate, a tiny end-to-end run writing every output, and the
expert-parallel harness over two spawned ranks. No timed assertions: timings are only checked to exist."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch
import torch.distributed as dist

from flashmoe_py import MoEConfig, backends
from flashmoe_py.bench import cli, counting, report, schema
from flashmoe_py.bench.candidates import Impl, Unavailable, builder
from flashmoe_py.bench.compare import main as compare_main
from flashmoe_py.bench.compare import pair_rows, ratio
from flashmoe_py.bench.runner import Plan, run_case
from flashmoe_py.bench.shapes import PRESETS, Case, scaled
from flashmoe_py.bench.timing import Ceilings
from flashmoe_py.reference import expert_block, per_expert
from flashmoe_py.routing import route

CPU = torch.device("cpu")
TINY = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=8, top_k=2)
FAKE_CEILINGS = Ceilings(matmul_flops_per_s=1e10, copy_bytes_per_s=1e10)
QUICK = Plan(repeats=1, warmup=0, input_sets=2, quick_ceilings=True)


def _header():
    return schema.run_header(CPU)


# ---- arguments and shapes ----------------------------------------------------------------------------

def test_parse_defaults_cover_the_acceptance_shapes():
    args = cli.build_parser().parse_args([])
    assert (args.dtype, args.mode, args.backend, args.world_size) == (["float32"], ["fwd"], ["all"], 1)
    cases = cli.build_cases(args, CPU)
    got = {(c.shape, c.tokens, c.cfg.hidden_size, c.cfg.ffn_hidden_size, c.cfg.num_experts, c.cfg.top_k,
            c.dtype) for c in cases}
    assert ("fine-grained", 4096, 512, 256, 128, 8, torch.float32) in got
    assert ("decode", 64, 1024, 512, 64, 8, torch.float32) in got
    names = cli.candidate_names(args.backend, CPU)
    assert {"reference", "naive_loop", "hf_eager", "hf_grouped_mm", "torch_grouped_mm"} <= set(names)


def test_parse_sweeps_and_custom_shapes():
    args = cli.build_parser().parse_args(["--tokens", "8", "64", "--hidden", "128", "--top-k", "4", "--dtype",
                                          "float32", "bfloat16", "--mode", "fwd", "fwdbwd", "--backend",
                                          "reference", "hf_eager"])
    cases = cli.build_cases(args, CPU)
    # one custom shape x 2 dtypes x 2 modes x 2 token counts; unset sizes come from fine-grained
    assert len(cases) == 8
    assert {(c.cfg.hidden_size, c.cfg.ffn_hidden_size, c.cfg.num_experts, c.cfg.top_k) for c in cases} == {
        (128, 256, 128, 4)}
    assert {c.tokens for c in cases} == {8, 64} and {c.mode for c in cases} == {"fwd", "fwdbwd"}
    assert cli.candidate_names(args.backend, CPU) == ["reference", "hf_eager"]


def test_parse_rejects_bad_values():
    p = cli.build_parser()
    for bad in (["--tokens", "0"], ["--scale", "0.5"], ["--mode", "train"], ["--dtype", "int8"],
                ["--preset", "gpt-5"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    with pytest.raises(SystemExit, match="--backend 'nope'"):
        cli.candidate_names(["nope"], CPU)


def test_presets_and_scale():
    # Published config.json values of each model's MoE layer.
    ds = PRESETS["deepseek-v3"].config()
    assert (ds.hidden_size, ds.ffn_hidden_size, ds.num_experts, ds.top_k) == (7168, 2048, 256, 8)
    assert (ds.score_func, ds.expert_bias, ds.num_expert_groups, ds.topk_groups, ds.num_shared_experts,
            ds.routed_scaling_factor) == ("sigmoid", True, 8, 4, 1, 2.5)
    q = PRESETS["qwen3-30b-a3b"].config()
    assert (q.hidden_size, q.ffn_hidden_size, q.num_experts, q.top_k, q.renormalize) == (2048, 768, 128, 8, True)
    m = PRESETS["mixtral-8x7b"].config()
    assert (m.hidden_size, m.ffn_hidden_size, m.num_experts, m.top_k) == (4096, 14336, 8, 2)
    o = PRESETS["olmoe-1b-7b"].config()
    assert (o.hidden_size, o.ffn_hidden_size, o.num_experts, o.top_k, o.renormalize) == (2048, 1024, 64, 8, False)
    # 7168/8 = 896, 2048/8 = 256: multiples of 16 already; 14336/3 = 4778.7 rounds to 4784 = 299*16
    s = scaled(PRESETS["deepseek-v3"], 8)
    assert (s.hidden, s.ffn, s.experts, s.top_k, s.name) == (896, 256, 256, 8, "deepseek-v3/8")
    assert scaled(PRESETS["mixtral-8x7b"], 3).ffn == 4784
    args = cli.build_parser().parse_args(["--preset", "olmoe-1b-7b", "--scale", "4", "--tokens", "16"])
    (case,) = cli.build_cases(args, CPU)
    assert (case.cfg.hidden_size, case.cfg.ffn_hidden_size, case.preset, case.scale) == (512, 256, "olmoe-1b-7b", 4)


# ---- counting formulas (hand-computed) ---------------------------------------------------------------

def test_flops_by_hand():
    cfg = MoEConfig(hidden_size=4, ffn_hidden_size=3, num_experts=5, top_k=2)  # swiglu: N_up = 6
    # T=7, A=14: router 2*7*4*5 = 280; up 2*14*4*6 = 672; down 2*14*3*4 = 336 -> 1288
    assert counting.forward_flops(cfg, 7, 14) == 1288
    shared = cfg.replace(num_shared_experts=1, shared_expert_gate=True)
    # + shared up 2*7*4*6 = 336, shared down 2*7*3*4 = 168, gate 2*7*4 = 56 -> 1288 + 560 = 1848
    assert counting.forward_flops(shared, 7, 14) == 1848
    plain = cfg.replace(activation="gelu")  # N_up = I = 3: up 2*14*4*3 = 336 -> 280 + 336 + 336 = 952
    assert counting.forward_flops(plain, 7, 14) == 952
    # backward = 2x forward, fwdbwd = 3x
    assert counting.work(cfg, 7, 14, 5, 4, "bwd").flops == 2576
    assert counting.work(cfg, 7, 14, 5, 4, "fwdbwd").flops == 3864


def test_min_bytes_by_hand():
    cfg = MoEConfig(hidden_size=4, ffn_hidden_size=3, num_experts=5, top_k=2)
    # fp32, all 5 experts hit: router 5*4*4 = 80 B; experts 5*(4*6 + 3*4)*4 = 720 B; W = 800
    # x read + out written: 2*7*4*4 = 224 -> forward 1024
    assert counting.work(cfg, 7, 14, 5, 4, "fwd").min_bytes == 1024
    # backward: weights read + weight grads written 2*800, x, dy read and dx written 3*112 -> 1936
    assert counting.work(cfg, 7, 14, 5, 4, "bwd").min_bytes == 1936
    assert counting.work(cfg, 7, 14, 5, 4, "fwdbwd").min_bytes == 1024 + 1936
    # only 3 experts hit: 80 + 3*36*4 = 512, + 224 -> 736
    assert counting.work(cfg, 7, 14, 3, 4, "fwd").min_bytes == 736
    # bf16 layer with an fp32 router: 80 + 5*36*2 = 360 -> 440, + 2*7*4*2 = 112 -> 552
    assert counting.work(cfg, 7, 14, 5, 2, "fwd", router_itemsize=4).min_bytes == 552
    with pytest.raises(ValueError, match="mode='train'"):
        counting.work(cfg, 7, 14, 5, 4, "train")


def test_routing_counts_and_wire_minimum_by_hand():
    ids = torch.tensor([[0, 1], [1, 2], [3, 2]])
    kept = torch.ones_like(ids, dtype=torch.bool)
    assert counting.routing_counts(ids, kept, 4) == (6, 4)
    # E=4 over W=2: rank 0 owns experts {0,1}, rank 1 owns {2,3}.
    # Seen from rank 0: token0 -> ranks {0}: 0 remote; token1 -> {0,1}: 1; token2 -> {1}: 1 -> 2 pairs
    assert counting.remote_pairs(ids, kept, 4, 2, rank=0) == 2
    # Seen from rank 1: token0 -> {0}: 1; token1 -> {0,1}: 1; token2 -> {1}: 0 -> 2 pairs
    assert counting.remote_pairs(ids, kept, 4, 2, rank=1) == 2
    # dropping token1's expert 2 (capacity) leaves token1 local to rank 0; expert 2 is still hit by token2
    kept[1, 1] = False
    assert counting.remote_pairs(ids, kept, 4, 2, rank=0) == 1
    assert counting.remote_assignments(ids, kept, 4, 2, rank=0) == 2, "token2's 3 and 2 (token1's 2 was dropped)"
    assert counting.remote_assignments(ids, kept, 4, 2, rank=1) == 3, "token0's 0, 1 and token1's 1"
    assert counting.routing_counts(ids, kept, 4) == (5, 4)
    kept[0, 0] = False  # expert 0 had only token0
    assert counting.routing_counts(ids, kept, 4) == (4, 3)
    # one row out and one back per pair: 2 * 3 pairs * H=16 * 2 bytes = 192
    assert counting.wire_min_bytes(3, 16, 2) == 192
    # with the routing of 4 remote assignments, a weight and an int32 id each: 4 * (4 + 4) = 32 -> 224 (fp64: 240)
    assert counting.wire_min_bytes(3, 16, 2, 4) == 224 and counting.wire_min_bytes(3, 16, 2, 4, 8) == 240
    # the one-sided transports: that plus a signal word per ordered pair of ranks and direction, 2 * 2 * 1 * 8
    assert counting.one_sided_wire_bytes(3, 4, 16, 2, 4, 2) == 224 + 32


def test_roofline_efficiency_by_hand():
    w = counting.Work(flops=2e9, min_bytes=1e9)
    # compute floor 2e9 / 1e12 = 2 ms; memory floor 1e9 / 1e11 = 10 ms -> memory bound; at 20 ms: 0.5
    eff, bound = counting.roofline_efficiency(w, 0.020, 1e12, 1e11)
    assert bound == "memory" and eff == pytest.approx(0.5)
    eff, bound = counting.roofline_efficiency(w, 0.004, 1e11, 1e12)  # 20 ms compute floor vs 1 ms
    assert bound == "compute" and eff == pytest.approx(5.0)


# ---- result schema ------------------------------------------------------------------------------------

def _case(mode="fwd", tokens=24, cfg=TINY):
    return Case("tiny", tokens, cfg, torch.float32, mode)


def _row(status="ok", **metrics):
    config = schema.config_dict(_case(), None, 3, 1, 2)
    if status == "ok":
        metrics.setdefault("latency_ms_median", 1.5)
    return schema.new_row(_header(), config, "reference", "baseline", status,
                          None if status == "ok" else "why", **metrics)


def test_schema_rows_are_complete_and_validated():
    r = _row(tflops=0.1)
    assert set(r) == set(schema.ROW_KEYS) and set(r["metrics"]) == set(schema.METRIC_KEYS)
    assert set(r["config"]) == set(schema.CONFIG_KEYS) and set(r["device"]) == set(schema.DEVICE_KEYS)
    assert r["device"]["type"] == "cpu" and r["versions"]["torch"] == torch.__version__ and r["commit"]
    assert r["metrics"]["kernel_launches"] is None  # absent metrics are present as None
    with pytest.raises(KeyError, match="unknown metric"):
        _row(speed=3)
    for mutate, msg in ((lambda x: x.pop("commit"), "missing keys"), (lambda x: x["config"].update(tokens="8"),
                        "tokens"), (lambda x: x.update(status="great"), "status"),
                        (lambda x: x["metrics"].update(latency_ms_median=None), "timed"),
                        (lambda x: x["metrics"].update(extra=1), "unexpected")):
        bad = copy.deepcopy(r)
        mutate(bad)
        with pytest.raises(ValueError, match=msg):
            schema.validate_row(bad)
    with pytest.raises(ValueError, match="needs a reason"):
        schema.new_row(_header(), r["config"], "x", "ours", "unavailable", None)


def test_schema_files_round_trip(tmp_path):
    rows = [_row(), _row("failed", max_rel_err=0.5)]
    j, c = schema.write_json_csv(rows, tmp_path / "out" / "run.json")
    assert (j.name, c.name) == ("run.json", "run.csv")
    assert schema.read_rows(j) == json.loads(json.dumps(rows))
    with c.open() as f:
        recs = list(csv.DictReader(f))
    assert list(recs[0]) == schema.csv_columns() and len(recs) == 2
    assert recs[1]["status"] == "failed" and recs[0]["config.hidden_size"] == "32"
    path = schema.append_jsonl(rows, tmp_path / "r.jsonl")
    schema.append_jsonl(rows[:1], path)
    assert len(schema.read_rows(path)) == 3


def test_terminal_table_prints_each_reason_once_under_the_table():
    # A CPU sweep's triton and fused rows share one long reason per backend in every case; the rows carry a tag and
    # the reasons are printed once, after the table, so the numbers stay one line per row.
    import io

    from rich.console import Console

    long = {"triton": "backend='triton' cannot run on cpu: the Triton kernels run on CUDA devices (or on CPU under "
                      "TRITON_INTERPRET=1, set before flashmoe_py.kernels is first imported), not here " + "x" * 80,
            "fused": "backend='fused' cannot run on cpu: the fused kernel runs on CUDA devices (or on CPU under "
                     "TRITON_INTERPRET=1) " + "y" * 80}
    rows = []
    for tokens in (16, 64, 256):
        config = schema.config_dict(_case(tokens=tokens), None, 3, 1, 2)
        rows.append(schema.new_row(_header(), config, "reference", "baseline", "ok", None, latency_ms_median=2.0,
                                   latency_ms_p20=1.9, latency_ms_p80=2.1, tokens_per_s=8e3, tflops=1e-3,
                                   roofline_efficiency=0.25, bound="compute", speedup_vs_best_baseline=1.0))
        for name, why in long.items():
            rows.append(schema.new_row(_header(), config, name, "ours", "unavailable", why))
        rows.append(schema.new_row(_header(), config, "hf_batched_mm", "baseline", "unavailable",
                                   f"would gather {tokens} GiB [rank 0] of weights"))  # differs per case
        rows.append(schema.new_row(_header(), config, "naive_loop", "baseline", "failed", "max_rel_err 1 > 1e-05"))
    buf = io.StringIO()
    report.print_table(rows, "title", Console(file=buf, width=200, color_system=None))
    lines = buf.getvalue().splitlines()
    tags = report.reason_tags(rows)
    assert list(tags.values()) == [f"[{i}]" for i in range(1, 7)]
    assert tags[("unavailable", long["triton"])] == "[1]" and tags[("failed", "max_rel_err 1 > 1e-05")] == "[4]"
    body = [ln for ln in lines if "custom" in ln or "triton" in ln or "fused" in ln or "naive_loop" in ln]
    for why in (*long.values(), "max_rel_err 1 > 1e-05", "would gather 16 GiB [rank 0] of weights"):
        assert sum(why[:60] in ln for ln in lines) == 1, why  # once, in its footnote
    notes = [ln for ln in lines if ln.startswith("[")]
    assert notes[0].startswith("[1] unavailable (triton): backend='triton' cannot run on cpu")
    assert notes[3] == "[4] failed (naive_loop): max_rel_err 1 > 1e-05"
    assert notes[2] == "[3] unavailable (hf_batched_mm): would gather 16 GiB [rank 0] of weights"  # markup-safe
    assert len(notes) == 6 and "[6] unavailable (hf_batched_mm): would gather 256 GiB" in notes[5]
    triton_rows = [ln for ln in body if " triton " in ln]
    assert len(triton_rows) == 3 and all("unavailable [1]" in ln for ln in triton_rows), triton_rows
    assert sum("unavailable [5]" in ln for ln in lines) == 1  # hf_batched_mm at T=64
    # one line per row: the table is its header, 3 cases x 5 rows and section rules, not wrapped reasons
    table_end = lines.index(next(ln for ln in lines if ln.startswith("[1]")))
    assert table_end < 40, buf.getvalue()


# ---- the correctness gate ---------------------------------------------------------------------------

def _wrong_output(pb):
    ref = builder("reference")(pb)
    return Impl(lambda x: ref.forward(x) * 1.01, ref.leaves, ref.grads)


def _wrong_gradient(pb):
    ref = builder("reference")(pb)  # right forward value, but x's gradient is lost (detached input)
    return Impl(lambda x: ref.forward(x.detach()) + 0 * x, ref.leaves, ref.grads)


def _raises(pb):
    raise RuntimeError("kernel exploded")


def _cannot(pb):
    raise Unavailable("needs a quantum computer")


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
def test_gate_marks_wrong_rows_failed_and_times_the_rest(seed, mode):
    builders = {"wrong_out": _wrong_output, "wrong_grad": _wrong_gradient, "boom": _raises, "nope": _cannot}
    names = ["reference", "naive_loop", "hf_eager", *builders]
    rows = {r["candidate"]: r for r in run_case(_case(mode), names, CPU, FAKE_CEILINGS,
                                                 Plan(1, 0, 2, seed=seed), _header(), builders=builders)}
    for good in ("reference", "naive_loop", "hf_eager"):
        r = rows[good]
        assert r["status"] == "ok", r["reason"]
        assert r["metrics"]["latency_ms_median"] > 0 and r["metrics"]["max_rel_err"] <= r["metrics"]["tolerance"]
    # scaling the output by 1.01 scales every gradient too: in bwd mode any of them may be the worst
    assert rows["wrong_out"]["status"] == "failed" and "relative error 0.01 >" in rows["wrong_out"]["reason"]
    assert rows["wrong_out"]["metrics"]["latency_ms_median"] is None
    assert rows["wrong_out"]["metrics"]["max_rel_err"] == pytest.approx(0.01, rel=1e-3)
    if mode == "bwd":
        assert rows["wrong_grad"]["status"] == "failed" and "grad x" in rows["wrong_grad"]["reason"]
    else:  # the forward value is right: in fwd mode it passes
        assert rows["wrong_grad"]["status"] == "ok"
    assert (rows["boom"]["status"], rows["boom"]["reason"]) == ("error", "RuntimeError: kernel exploded")
    assert (rows["nope"]["status"], rows["nope"]["reason"]) == ("unavailable", "needs a quantum computer")
    best = min((r for r in rows.values() if r["status"] == "ok" and r["kind"] == "baseline"),
               key=lambda r: r["metrics"]["latency_ms_median"])
    assert best["metrics"]["speedup_vs_best_baseline"] == 1.0


# ---- end to end ---------------------------------------------------------------------------------------

def test_end_to_end_writes_table_json_csv_jsonl_png(tmp_path, capsys):
    argv = ["--hidden", "32", "--ffn", "16", "--experts", "8", "--top-k", "2", "--tokens", "16", "48",
            "--repeats", "1", "--warmup", "0", "--min-time", "0", "--input-sets", "1", "--no-progress",
            "--ceilings", "quick", "--results-dir", str(tmp_path / "results"), "--out", str(tmp_path / "{device}"),
            "--plot", str(tmp_path / "{device}.png"), "--markdown", str(tmp_path / "{device}.md")]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("reference", "naive_loop", "hf_eager", "hf_grouped_mm", "torch_grouped_mm", "vs best"):
        assert name in printed
    slug = schema.device_info(CPU)["slug"]
    rows = schema.read_rows(tmp_path / f"{slug}.json")
    flat = " ".join(printed.split())  # each reason a row was not timed is printed once, in its footnote
    for (status, why), tag in report.reason_tags(rows).items():
        assert flat.count(f"{tag} {status} (") == 1 and " ".join(why.split()) in flat, (tag, why, printed)
        assert f"{status}: {why[:20]}" not in flat, printed  # not in the rows (as `status: reason`)
    assert flat.count("unavailable [") == sum(r["status"] == "unavailable" for r in rows), printed
    assert {r["config"]["tokens"] for r in rows} == {16, 48}
    ok = {r["candidate"] for r in rows if r["status"] == "ok"}
    assert {"reference", "naive_loop", "hf_eager", "hf_grouped_mm"} <= ok
    for r in rows:
        m = r["metrics"]
        if r["status"] == "ok":
            assert m["tflops"] > 0 and m["roofline_efficiency"] > 0 and m["aten_ops"] > 0
            assert m["matmul_tflops_ceiling"] > 0 and m["copy_gbps_ceiling"] > 0 and m["peak_mem_bytes"] >= 0
    assert len(schema.read_rows(tmp_path / "results" / f"{slug}.jsonl")) == len(rows)
    with (tmp_path / f"{slug}.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    md = (tmp_path / f"{slug}.md").read_text()
    assert "| custom T=48 | hf_eager |" in md and "Ceilings measured in this run" in md
    png = (tmp_path / f"{slug}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # compare: a file against a copy with every reference time doubled -> ratio 2 on those rows
    slower = copy.deepcopy(rows)
    for r in slower:
        if r["candidate"] == "reference":
            for k in ("latency_ms_median", "latency_ms_p20", "latency_ms_p80"):
                r["metrics"][k] *= 2
    schema.write_json_csv(slower, tmp_path / "slower")
    pairs = pair_rows(rows, slower)
    assert len(pairs) == len(rows)
    assert [ratio(a, b) for _, a, b in pairs if a["candidate"] == "reference"] == [2.0, 2.0]
    assert compare_main([str(tmp_path / f"{slug}.json"), str(tmp_path / "slower.json")]) == 0
    assert "B/A" in capsys.readouterr().out


# ---- expert parallelism over spawned ranks -------------------------------------------------------------

class FakeEPLayer(torch.nn.Module):
    """A correct but naive expert-parallel layer, to exercise the harness until FusedMoE has its own:
    all-gather the tokens, run the local experts densely, all-reduce, keep this rank's rows."""

    def __init__(self, cfg, *, backend, process_group, transport, device, dtype):
        super().__init__()
        if transport == "broken":
            raise ValueError("transport='broken': not on this machine")
        self.cfg, self.pg = cfg, process_group
        self.world, self.rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        el = cfg.num_experts // self.world
        fk = dict(device=device, dtype=dtype)
        self.router_weight = torch.nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, **fk))
        self.w_up = torch.nn.Parameter(torch.empty(el, cfg.hidden_size, cfg.up_size, **fk))
        self.w_down = torch.nn.Parameter(torch.empty(el, cfg.ffn_hidden_size, cfg.hidden_size, **fk))
        self.stats = None

    def forward(self, x):
        from flashmoe_py.records import MoEParams, MoEStats

        cfg, w = self.cfg, self.world
        parts = [torch.empty_like(x) for _ in range(w)]
        dist.all_gather(parts, x.detach(), group=self.pg)
        xs = torch.cat(parts)
        r = route(xs, self.router_weight, None, cfg)
        p = MoEParams(self.router_weight, self.w_up, self.w_down)
        out = torch.zeros(xs.shape, dtype=torch.float32)
        el = cfg.num_experts // w
        experts = per_expert(p)
        for e in range(el):
            weight = (r.topk_weights * (r.topk_ids == self.rank * el + e)).sum(-1, keepdim=True)
            out += weight * expert_block(xs, experts[e], cfg.activation).float()
        dist.all_reduce(out, group=self.pg)
        t = x.shape[0]
        self.stats = MoEStats(torch.zeros(0), torch.zeros(()), bytes_sent=2 * (w - 1) * x.numel() * x.element_size())
        return out[self.rank * t:(self.rank + 1) * t].to(x.dtype)


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_distributed_harness_times_transports_and_counts_wire_bytes():
    from flashmoe_py.bench import distributed

    cases = [Case("tiny", 24, TINY, torch.float32, "fwd", world_size=2)]
    rows = distributed.spawn(2, cases, ["reference"], ["alltoall", "onesided", "broken"], QUICK, _header(),
                             show_progress=False, layer_factory=FakeEPLayer)
    by = {r["candidate"]: r for r in rows}
    assert list(by) == ["reference/alltoall", "reference/onesided", "reference/broken"]
    assert by["reference/alltoall"]["kind"] == "baseline" and by["reference/onesided"]["kind"] == "ours"
    for name in ("reference/alltoall", "reference/onesided"):
        r = by[name]
        assert r["status"] == "ok", r["reason"]
        m = r["metrics"]
        assert m["latency_ms_median"] > 0 and m["max_rel_err"] <= m["tolerance"]
        # the fake sends x to the other rank and back: 2 ranks * 2 * 24 * 32 * 4 bytes
        assert m["wire_bytes"] == 2 * 2 * 24 * 32 * 4
        assert 0 < m["wire_min_bytes"] <= m["wire_bytes"]
        assert r["config"]["world_size"] == 2 and r["config"]["transport"] == name.split("/")[1]
    assert by["reference/broken"]["status"] == "unavailable"
    assert "rank 0: ValueError: transport='broken'" in by["reference/broken"]["reason"]
    # The Markdown table of a distributed run carries the wire bytes (MB, then the minimum and their ratio) and
    # copes with the metrics a distributed run cannot measure (operator counts, peak memory).
    table = report.markdown_table(rows).splitlines()
    assert table[0].endswith("| wire MB (min, ratio) |")
    wire_mb = 2 * 2 * 24 * 32 * 4 / 1e6
    ratio = rows[0]["metrics"]["wire_bytes"] / rows[0]["metrics"]["wire_min_bytes"]
    assert f"| {wire_mb:.2f} (" in table[2] and f", {ratio:.2f}x) |" in table[2]
    assert all(line.count("|") == table[0].count("|") for line in table)


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_world_size_2_cli_reports_every_transport(tmp_path, capsys):
    argv = ["--world-size", "2", "--hidden", "32", "--ffn", "16", "--experts", "8", "--top-k", "2", "--tokens",
            "16", "--repeats", "1", "--warmup", "0", "--input-sets", "1", "--no-progress", "--ceilings", "quick",
            "--out", str(tmp_path / "ep"), "--results-dir", str(tmp_path)]
    cli.main(argv)
    rows = schema.read_rows(tmp_path / "ep.json")
    by = {r["candidate"]: r for r in rows}
    assert list(by)[:3] == ["reference/alltoall", "reference/shm", "reference/mpi"]
    # Spawned gloo ranks run alltoall and shm; mpi needs mpirun, and triton needs a GPU on this machine:
    # those rows must say why rather than vanish.
    for name in ("reference/alltoall", "reference/shm"):
        assert by[name]["status"] == "ok", by[name]
        assert by[name]["metrics"]["wire_bytes"] >= by[name]["metrics"]["wire_min_bytes"] > 0
    assert by["reference/mpi"]["status"] == "unavailable" and "mpirun" in by["reference/mpi"]["reason"]
    # The triton rows run when the backend can (under the interpreter the suite may have switched on),
    # and otherwise say why.
    triton_runs = backends.unavailable_reason("triton", torch.device("cpu")) is None
    for name, r in by.items():
        if name.startswith("triton/") and name != "triton/mpi":
            assert r["status"] == ("ok" if triton_runs else "unavailable"), r
    assert "wire MB" in capsys.readouterr().out
    assert not math.isnan(rows[0]["metrics"]["flops"])


def test_a_rank_started_by_mpirun_joins_the_launch_instead_of_spawning(monkeypatch):
    # Under mpirun each process is one rank: spawning --world-size ranks from each would start ranks that nobody
    # joins (the mpi rows then never ran). MPI's own variables count, as for the mpi transport.
    from flashmoe_py.bench import distributed

    for name in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "RANK",
                 "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched()
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert distributed.launched()
