"""The GPU measurements of `make gpu-check` (flashmoe_py/bench/kernel_perf.py) on the CPU: the FLOP and byte
formulas at the shapes, the plan, the time budget (a fake clock), guarded cases, the derived verdicts, the
parallel compilation's bookkeeping and the dry run; one tiny end-to-end run on a GPU."""

import json
import sys
import time

import pytest

from flashmoe_py.bench import counting
from flashmoe_py.bench import kernel_perf as kp

SHAPE1, T1 = kp.SHAPES["shape1"]
SHAPE3, T3 = kp.SHAPES["shape3"]


def _by_kernel(gs):
    return {g.kernel: g for g in gs}


def test_gemm_flops_at_shape1_and_shape3():
    s1 = _by_kernel(kp.gemms(SHAPE1.hidden, SHAPE1.ffn, SHAPE1.top_k, T1, backward=True))
    # 98304 routed rows; hand-computed 2*m*k*n
    assert (s1["up"].m, s1["up"].k, s1["up"].n) == (98304, 2048, 2816)
    assert s1["up"].flops == 1_133_871_366_144 and s1["down"].flops == 566_935_683_072
    assert (s1["dw[up]"].m, s1["dw[up]"].k, s1["dw[up]"].n) == (2048, 98304, 2816)
    assert (s1["dw[down]"].m, s1["dw[down]"].k, s1["dw[down]"].n) == (1408, 98304, 2048)
    s3 = _by_kernel(kp.gemms(SHAPE3.hidden, SHAPE3.ffn, SHAPE3.top_k, T3, backward=True))
    assert (s3["up"].m, s3["up"].k, s3["up"].n) == (32768, 4096, 28672)
    assert s3["up"].flops == 7_696_581_394_432 and s3["down"].flops == 3_848_290_697_216
    for gs in (s1, s3):
        fwd = sum(gs[k].flops for k in kp.FORWARD_GEMMS)
        bwd = sum(gs[k].flops for k in kp.BACKWARD_GEMMS)
        assert bwd == 2 * fwd  # counting.py: backward = 2 x forward (each matmul's input and weight gradient)
    # The forward's total adds the router, 2*T*H*E (4 294 967 296 at shape 1), as counting.forward_flops does.
    router = 2 * T1 * SHAPE1.hidden * SHAPE1.experts
    assert router == 4_294_967_296
    assert kp.forward_flops(SHAPE1, T1) == sum(s1[k].flops for k in kp.FORWARD_GEMMS) + router


def test_decode_bytes_are_the_hit_experts_weights():
    assert kp.expert_bytes(SHAPE1.hidden, SHAPE1.ffn, 64) == 1_107_296_256  # 64 x (2048*2816 + 1408*2048) x 2
    assert kp.expert_bytes(SHAPE3.hidden, SHAPE3.ffn, 8) == 2_818_572_288
    assert kp.expert_bytes(SHAPE1.hidden, SHAPE1.ffn, 10) * 6.4 == pytest.approx(1_107_296_256)
    # counting.weight_bytes is the same plus the router's E*H
    cfg = SHAPE1.config()
    assert counting.weight_bytes(cfg, 64, 2) - 64 * 2048 * 2 == kp.expert_bytes(2048, 1408, 64)
    assert kp.expected_experts_hit(64, 6, 1) == pytest.approx(6.0)
    assert 63.5 < kp.expected_experts_hit(64, 6, 64) < 64


@pytest.mark.parametrize("name, kind", [("up[swiglu]", "up"), ("down[scaled]", "down"), ("down[atomic]", "down"),
                                        ("dh[swiglu]", "dh"), ("dx", "dx"), ("dx[atomic]", "dx"),
                                        ("dw[up]", "dw[up]"), ("dw[down]", "dw[down]"), ("route[logits]", None),
                                        ("scatter", None), ("combine", None), ("combine#2", None)])
def test_launch_names_map_to_their_gemm(name, kind):
    assert kp.gemm_kind(name) == kind


def test_launch_keys_number_repeated_names():
    assert kp.launch_keys(["route", "combine", "dx", "combine"]) == ["route", "combine", "dx", "combine#2"]


def test_gemm_rates():
    plan = {"up": kp.Gemm("up", 1000, 100, 10).as_dict()}
    rates = kp.gemm_rates({"route": 1.0, "up[swiglu]": 0.002}, plan)  # 2e6 FLOP in 2 us = 1 TFLOP/s
    assert rates["up"]["ms"] == 0.002 and rates["up"]["tflops"] == pytest.approx(1.0)


def test_the_plan():
    cases = kp.build_plan()
    names = [c.name for c in cases]
    assert names == ["ceilings", "fwd-kernels/shape1", "dense/shape1", "train-kernels/shape1", "order/shape1",
                     "decode/triton", "baselines/fwd", "baselines/fwdbwd", "fwd-kernels/shape3", "dense/shape3",
                     "train-kernels/shape3", "decode/fused"]
    assert {c.part for c in cases} == {"ceilings", "a", "b", "c", "d"}
    assert [c.name for c in cases if c.optional] == ["decode/fused"]
    by = {c.name: c for c in cases}
    assert by["decode/triton"].plan["tokens"] == [64, 128, 256, 512] and by["decode/triton"].plan["shape"] == "shape1"
    assert set(by["train-kernels/shape3"].plan["gemms"]) == set(kp.FORWARD_GEMMS + kp.BACKWARD_GEMMS)
    assert by["fwd-kernels/shape1"].plan["forward_flops"] == kp.forward_flops(SHAPE1, T1)
    assert all(c.est_s > 0 and (c.warm is None) == (c.compile_s == 0) for c in cases)
    assert len({c.name for c in cases}) == len(cases)
    json.dumps([c.plan for c in cases])  # the record holds the plans
    tiny = kp.build_plan(tiny=True)
    assert [c.name for c in tiny][:3] == ["ceilings", "fwd-kernels/tiny", "dense/tiny"]


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _case(name, clock, cost, est=1.0, result=None, error=None, warm=False, compile_s=0.0, optional=False):
    def run(ctx):
        clock.t += cost
        if error is not None:
            raise error
        return result if result is not None else {"ran": name}
    return kp.PerfCase(name, "a", name, run, est, warm=(lambda ctx: None) if warm else None,
                       compile_s=compile_s, optional=optional)


def test_cases_that_do_not_fit_the_time_left_are_skipped():
    clock = FakeClock()
    cases = [_case("one", clock, 4), _case("big", clock, 1, est=10), _case("two", clock, 2, est=3),
             _case("late", clock, 1, est=2.5)]
    updates = []
    rows = kp.run_cases(cases, None, deadline=clock.t + 8, clock=clock, on_update=lambda r: updates.append(len(r)),
                        print_fn=lambda s: None)
    assert [r["status"] for r in rows] == ["ok", "skipped", "ok", "skipped"]
    assert rows[1]["detail"].startswith("skipped: time budget (4 s left, about 10 s needed)")
    assert rows[3]["detail"].startswith("skipped: time budget (2 s left") and rows[0]["seconds"] == 4
    assert updates == [1, 2, 3, 4]  # the record is rewritten after every case


def test_compile_time_counts_unless_the_case_was_compiled_first():
    clock = FakeClock()
    cases = [_case("warmed", clock, 1, est=1, warm=True, compile_s=20),
             _case("cold", clock, 1, est=1, warm=True, compile_s=20)]
    rows = kp.run_cases(cases, None, deadline=clock.t + 10, clock=clock, compiled={"warmed"}, print_fn=lambda s: None)
    assert [r["status"] for r in rows] == ["ok", "skipped"] and rows[1]["est_s"] == 21


def test_a_failing_case_is_recorded_and_the_others_run():
    clock = FakeClock()
    cases = [_case("boom", clock, 1, error=RuntimeError("kernel exploded")), _case("after", clock, 1),
             _case("absent", clock, 1, error=kp.CaseUnavailable("no fused backend here")),
             _case("optional", clock, 1, error=ValueError("x"), optional=True)]
    lines = []
    rows = kp.run_cases(cases, None, deadline=clock.t + 100, clock=clock, print_fn=lines.append)
    assert [r["status"] for r in rows] == ["error", "ok", "unavailable", "error"]
    assert rows[0]["detail"] == "RuntimeError: kernel exploded" and "kernel exploded" in rows[0]["traceback"]
    assert rows[1]["data"] == {"ran": "after"}
    assert "[1/4] boom" in lines[0] and "error" in lines[0]
    assert kp.exit_status(rows) == 1
    assert kp.exit_status(rows[1:]) == 0  # unavailable and an optional case's error do not fail the step


def test_the_deadline_alarm_stops_the_case_and_skips_the_rest():
    clock = FakeClock()
    cases = [_case("first", clock, 1), _case("hit", clock, 5, error=kp.OutOfTime()), _case("never", clock, 1)]
    rows = kp.run_cases(cases, None, deadline=clock.t + 100, clock=clock, print_fn=lambda s: None)
    assert [r["status"] for r in rows] == ["ok", "skipped", "skipped"]
    assert "stopped at the deadline" in rows[1]["detail"] and kp.exit_status(rows) == 0


def test_an_interrupt_records_the_running_case():
    clock = FakeClock()
    seen = []
    cases = [_case("killed", clock, 1, error=KeyboardInterrupt()), _case("never", clock, 1)]
    with pytest.raises(KeyboardInterrupt):
        kp.run_cases(cases, None, deadline=clock.t + 100, clock=clock, on_update=lambda r: seen.append(list(r)),
                     print_fn=lambda s: None)
    assert [r["status"] for r in seen[-1]] == ["interrupted"]


def _ok(name, plan, data):
    return {"name": name, "status": "ok", "plan": plan, "data": data, "optional": False}


def _fake_results(fwd_ms):
    up, down = (kp.Gemm("up", 1000, 1000, 1000), kp.Gemm("down", 1000, 1000, 500))  # 2e9 and 1e9 FLOP
    dense = {"up": {**up.as_dict(), "ms": 2.0, "tflops": 1.0}, "down": {**down.as_dict(), "ms": 1.0, "tflops": 1.0}}
    kernels = {"up": {**up.as_dict(), "ms": 2.5, "tflops": 0.8}, "down": {**down.as_dict(), "ms": 1.0, "tflops": 1.0}}
    return [
        _ok("ceilings", {}, {"copy_bytes_per_s": 1e12}),
        _ok("fwd-kernels/s", {"shape": "s", "forward_flops": 3.3e9}, {"call_ms": {"median": fwd_ms}, "gemms": kernels}),
        _ok("dense/s", {"shape": "s"}, {"gemms": dense}),
        _ok("decode/triton", {}, {"tokens": [{"tokens": 64, "experts_hit": 8, "weight_bytes": 1e9, "eager_ms": 2.0,
                                              "graph_ms": 1.25}]}),
        _ok("baselines/fwd", {}, {"candidates": {"triton": {"status": "ok", "ms": 2.0},
                                                 "torch_grouped_mm": {"status": "ok", "ms": 3.0},
                                                 "hf_grouped_mm": {"status": "unavailable"}}}),
        _ok("order/s", {}, {"note": None, "kernels": {"up": {"configured_group_m": 8, "configured_ms": 2.5,
                                                             "group_m1_ms": 2.75, "speedup": 1.1}}}),
        {"name": "train-kernels/x", "status": "skipped", "plan": {}, "data": None, "optional": False,
         "detail": "skipped: time budget"},
    ]


def test_derived_numbers_and_the_forward_verdict():
    # torch.mm: 3e9 FLOP in 3 ms (1 TFLOP/s), so the forward's 3.3e9 FLOP take 3.3 ms at cuBLAS's rate.
    d = kp.derive(_fake_results(fwd_ms=3.5))
    fb = d["forward_bound"]
    assert fb["bound_ms"] == pytest.approx(3.3) and fb["ratio"] == pytest.approx(3.3 / 3.5) and fb["reached"]
    up = next(k for k in d["kernels"] if k["kernel"] == "up")
    assert up["ratio"] == pytest.approx(0.8) and up["pass"] == "forward"
    dec = d["decode"][0]
    assert dec["bound_ms"] == pytest.approx(1.0)  # 1 GB over 1e12 B/s
    assert dec["eager_efficiency"] == pytest.approx(0.5) and dec["graph_efficiency"] == pytest.approx(0.8)
    assert d["baselines"]["fwd"]["torch_grouped_mm"]["triton_speedup"] == pytest.approx(1.5)
    lines = kp.summary_lines(_fake_results(fwd_ms=3.5))
    assert lines[-1].endswith("reaches 0.9: yes") and "0.94 of the cuBLAS bound" in lines[-1]
    assert any("skipped (time budget): train-kernels/x" in ln for ln in lines)
    assert any("hf_grouped_mm unavailable" in ln for ln in lines)
    slow = kp.summary_lines(_fake_results(fwd_ms=4.0))
    assert slow[-1].endswith("reaches 0.9: no")


def test_the_verdict_says_when_it_could_not_be_measured():
    rows = [r for r in _fake_results(3.5) if not r["name"].startswith("dense/")]
    assert kp.summary_lines(rows)[-1].startswith("forward vs cuBLAS bound: not measured")
    assert kp.summary_lines([]) == ["forward vs cuBLAS bound: not measured (needs fwd-kernels and dense of the "
                                    "first shape)"]


def test_parallel_compilation_reports_and_stops_at_its_deadline(monkeypatch):
    reports = {"fast": "print('WARM fast ok 0.5')", "broken": "raise SystemExit(3)",
               "hangs": "import time; time.sleep(60)"}
    monkeypatch.setattr(kp, "_worker_argv", lambda names, tiny: [sys.executable, "-c", reports[names[0]]])
    ran = []
    cases = [kp.PerfCase("mine", "a", "", None, 1, warm=lambda ctx: ran.append(ctx), compile_s=1)]
    cases += [kp.PerfCase(n, "a", "", None, 1, warm=lambda ctx: None, compile_s=1) for n in reports]
    t0 = time.time()
    status = kp.compile_in_parallel(cases, "ctx", until=time.time() + 3, workers=3, print_fn=lambda s: None)
    assert time.time() - t0 < 15
    assert ran == ["ctx"] and status["mine"]["status"] == "ok"
    assert status["fast"] == {"status": "ok", "seconds": 0.5, "detail": ""}
    assert status["broken"]["status"] == "error" and status["hangs"]["status"] == "killed"
    assert kp.compile_in_parallel(cases, "ctx", until=0, workers=0) == {}


def test_parse_warm_log():
    text = "noise\nWARM a ok 1.5\nWARM b error 2.0 RuntimeError: no\n"
    assert kp.parse_warm_log(text) == {"a": {"status": "ok", "seconds": 1.5, "detail": ""},
                                       "b": {"status": "error", "seconds": 2.0, "detail": "RuntimeError: no"}}


@pytest.mark.slow  # imports the kernels and records every launch of both shapes on meta tensors
def test_dry_run_prints_the_plan_and_checks_the_launch_names(capsys):
    assert kp.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "kernel-perf dry run: ok" in out
    assert out.count("GEMMs counted and launched: ok") == 2
    assert "[98304x2048]x[2048x2816]     1133.9 GFLOP" in out
    assert "T=64" in out and "12. decode/fused" in out


@pytest.mark.gpu
def test_a_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "perf.json"
    names = ["ceilings", "fwd-kernels/tiny", "dense/tiny", "order/tiny", "decode/triton"]
    # One compile process besides this one (the order case's GROUP_M=1 kernels) exercises the parallel compilation.
    rc = kp.main(["--tiny", "--budget", "45", "--workers", "1", "--out", str(out), "--only", *names])
    data = json.loads(out.read_text())
    assert data["finished"] and data["schema"] == kp.SCHEMA
    assert rc == 0, data["cases"]
    assert {r["name"]: r["status"] for r in data["cases"]} == dict.fromkeys(names, "ok"), data["cases"]
    assert data["warm"]["order/tiny"]["status"] == "ok", data["warm"]
    order = data["derived"]["order"]["kernels"]
    assert order["up"]["forced_launched_group_m"] == 1 and order["up"]["group_m1_ms"] > 0
    fb = data["derived"]["forward_bound"]
    assert fb is not None and fb["forward_ms"] > 0 and data["summary"][-1].startswith("forward at tiny")
    triton = next(r for r in data["cases"] if r["name"] == "decode/triton")["data"]["tokens"]
    assert all(r.get("graph_ms") and r.get("eager_ms") for r in triton), triton


def _real_case(name, fn, est=0.1):
    return kp.PerfCase(name, "a", name, lambda ctx: fn(), est)


def test_the_alarm_ends_a_case_at_the_deadline_and_the_record_is_complete(tmp_path):
    cases = [_real_case("quick", lambda: {"x": 1}), _real_case("sleeps", lambda: time.sleep(20)),
             _real_case("after", lambda: {"x": 2})]
    rec = kp.Record(tmp_path / "perf.json", {"budget_s": 1})
    t0 = time.time()
    lines = []
    rc = kp.measure(cases, None, t0, t0 + 1.5, rec, print_fn=lines.append)
    assert time.time() - t0 < 5 and rc == 0
    data = json.loads((tmp_path / "perf.json").read_text())
    assert [r["status"] for r in data["cases"]] == ["ok", "skipped", "skipped"]
    assert "stopped at the deadline" in data["cases"][1]["detail"]
    assert data["finished"] and not data["interrupted"] and data["summary"] == lines[-1].split("\n")
    assert "skipped (time budget): sleeps, after" in lines[-1]


def test_a_kill_leaves_what_was_measured(tmp_path):
    def killed():
        raise KeyboardInterrupt
    rec = kp.Record(tmp_path / "perf.json", {})
    t0 = time.time()
    rc = kp.measure([_real_case("done", lambda: {"x": 1}), _real_case("killed", killed)], None, t0, t0 + 60, rec,
                    print_fn=lambda s: None)
    data = json.loads((tmp_path / "perf.json").read_text())
    assert rc == 130 and data["interrupted"] and not data["finished"]
    assert [r["status"] for r in data["cases"]] == ["ok", "interrupted"] and data["cases"][0]["data"] == {"x": 1}
