"""`make gpu-check`'s orchestrator (flashmoe_py/gpu_check.py) on the CPU: the plan fits 8 minutes, every step
leaves its record whatever happens to it, a step over its budget is killed with its children, and $OUT never
gets more than the 8 files the device machine sends back."""

import json
import os
import sys
import time

import pytest

from flashmoe_py import gpu_check as gc

PY = sys.executable
STAMP = "20260101-000000"


def _step(name, code, budget=30, **kw):
    return gc.Step(name, f"step {name}", (PY, "-c", code), budget, needs_gpu=kw.pop("needs_gpu", False),
                   needs_install=kw.pop("needs_install", False), **kw)


def _run(tmp_path, steps, **kw):
    lines = []
    kw.setdefault("has_gpu", True)  # the fake steps need none; a real run without one is never OK
    check = gc.Check(steps, tmp_path / "results", STAMP, print_fn=lines.append, **kw)
    rc = check.run()
    return rc, "\n".join(lines), json.loads(check.summary_path().read_text()), check


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(ln.startswith("State:") and "Z" in ln.split()[1] for ln in f)
    except FileNotFoundError:
        return False


def test_the_plan_fits_eight_minutes():
    steps = gc.plan()
    assert [s.name for s in steps] == ["device", "gpu-tests", "fused-all", "local-ranks", "sanitizer", "bench",
                                       "kernel-perf"]
    total = sum(s.budget_s for s in steps)
    assert total <= 450, f"steps take {total} s: leave the venv set-up its share of 8 minutes"
    assert total + gc.INSTALL_BUDGET_S <= gc.LIMIT_S <= 480
    assert all(s.budget_s > 0 for s in steps) and len({s.name for s in steps}) == len(steps)
    assert not steps[0].needs_gpu and all(s.needs_gpu for s in steps[1:])
    assert all(all(c.isalnum() or c == "-" for c in s.name) for s in steps)  # $OUT's file-name rule
    budgets = {s.name: s.budget_s for s in steps}
    # install 60 + device 15 + gpu tests 120 + fused 70 + ranks 40 + sanitizer 65 + bench 50 + measurements 60
    assert budgets == {"device": 15, "gpu-tests": 120, "fused-all": 70, "local-ranks": 40, "sanitizer": 65,
                       "bench": 50, "kernel-perf": 60}
    assert gc.INSTALL_BUDGET_S + sum(budgets.values()) == 480


@pytest.mark.slow  # the real plan's dry checks: collecting the tests, parsing the benchmark's options
def test_dry_run_lists_every_step_and_writes_its_records(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    rc = gc.main(["--dry-run", "--results", str(tmp_path), "--stamp", STAMP], has_gpu=False)
    out = capsys.readouterr().out
    assert rc == 0, out
    for i, s in enumerate(gc.plan(), 1):
        assert f"{i}. {s.name}" in out and f"{s.budget_s} s" in out
        assert (tmp_path / f"gpu-check-{STAMP}-{s.name}.txt").is_file()
    summary = json.loads((tmp_path / f"gpu-check-{STAMP}-summary.json").read_text())
    assert summary["finished"] and summary["ok"] and summary["dry_run"]
    status = {r["name"]: r for r in summary["steps"]}
    assert status["device"]["status"] == "ok" and "torch" in summary["device"]
    for name in ("gpu-tests", "fused-all", "sanitizer", "bench", "kernel-perf"):
        assert status[name]["status"] == "skipped" and status[name]["detail"].startswith("no GPU")
        assert status[name]["dry_check"]["ok"], status[name]
    assert "skipped (no GPU)" in out and "[1/7] device and versions" in out
    assert "kernel-perf dry run: ok" in (tmp_path / f"gpu-check-{STAMP}-kernel-perf.txt").read_text()


def test_a_failing_step_leaves_records_and_a_nonzero_exit(tmp_path):
    steps = [_step("one", "print('fine')"), _step("two", "print('boom'); raise SystemExit(3)"),
             _step("three", "print('after')")]
    rc, out, summary, check = _run(tmp_path, steps)
    assert rc == 1
    assert [r["status"] for r in summary["steps"]] == ["ok", "failed", "ok"]
    assert summary["steps"][1]["rc"] == 3 and summary["finished"] and summary["ok"] is False
    record = check.record_path(steps[1]).read_text()
    assert "boom" in record and "# failed rc=3" in record
    assert "[2/3] step two" in out and "FAILED rc=3" in out and "boom" in out
    assert "after" in check.record_path(steps[2]).read_text()


def test_the_summary_is_written_before_each_step_runs(tmp_path):
    # What a run killed mid-step leaves: the summary already names the step that was running.
    path = tmp_path / "results" / f"gpu-check-{STAMP}-summary.json"
    code = f"import json; print([r['status'] for r in json.load(open({str(path)!r}))['steps']])"
    rc, _, _, check = _run(tmp_path, [_step("first", "pass"), _step("peek", code)])
    assert rc == 0
    assert "['ok', 'running']" in check.record_path(check.steps[1]).read_text()


def test_a_step_over_its_budget_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    code = ("import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    steps = [_step("hang", code, budget=2), _step("next", "print('still runs')")]
    t0 = time.monotonic()
    rc, out, summary, check = _run(tmp_path, steps)
    assert time.monotonic() - t0 < 30
    assert rc == 1
    row = summary["steps"][0]
    assert row["status"] == "timeout" and row["seconds"] < 15 and "killed" in row["detail"]
    assert "TIMEOUT (killed after" in out and "(budget 2 s)" in out
    assert "started" in check.record_path(steps[0]).read_text()
    assert not _alive(int(pidfile.read_text())), "the step's child outlived it"
    assert summary["steps"][1]["status"] == "ok"


def test_the_eight_minute_deadline_shortens_and_then_skips_steps(tmp_path):
    # Started (with the install) nearly 8 minutes ago: 8 s are left, so the first step gets about 6 s, not 300.
    steps = [_step("slow", "import time; time.sleep(30)", budget=300), _step("late", "pass")]
    rc, out, summary, _ = _run(tmp_path, steps, started_at=time.time() - (gc.LIMIT_S - 8))
    assert rc == 1
    slow, late = summary["steps"]
    assert slow["status"] == "timeout" and slow["seconds"] < 10
    assert late["status"] == "skipped" and late["detail"] == "out of time"
    assert "skipped (out of time)" in out


def test_out_never_gets_more_than_eight_files(tmp_path):
    out_dir = tmp_path / "out"
    steps = [_step(f"s{i}", f"print('output of step {i}' * {i + 1})") for i in range(11)]
    log = tmp_path / "install.txt"
    log.write_text("install log\n")
    rc, _, summary, check = _run(tmp_path, steps, out_dir=out_dir, install_rc=0, install_log=log,
                                 started_at=time.time() - 5)
    assert rc == 0
    files = sorted(os.listdir(out_dir))
    assert len(files) <= gc.OUT_MAX_FILES, files
    assert f"gpu-check-{STAMP}-summary.json" in files and f"gpu-check-{STAMP}-records.txt" in files
    sent = "".join((out_dir / f).read_text() for f in files)
    for i in range(11):
        assert f"output of step {i}" in sent  # merged, never dropped
    assert "install log" in sent
    assert sorted(summary["out_files"]) == files
    assert summary["install"]["status"] == "ok" and summary["install"]["seconds"] >= 5


def test_select_out_files_keeps_json_apart_and_merges_the_smallest_text(tmp_path):
    paths = []
    for i in range(12):
        p = tmp_path / f"r{i:02d}.txt"
        p.write_text("x" * (100 - i))  # r11 is the smallest
        paths.append(p)
    for name in ("summary.json", "bench.json"):
        (tmp_path / name).write_text("{}")
        paths.append(tmp_path / name)
    sel = gc.select_out_files(paths, "stem")
    assert len(sel) == gc.OUT_MAX_FILES
    names = [n for n, _ in sel]
    assert "summary.json" in names and "bench.json" in names and "stem-records.txt" in names
    merged = dict(sel)["stem-records.txt"]
    assert len(merged) == 12 - 5 and tmp_path / "r11.txt" in merged and tmp_path / "r00.txt" not in merged
    assert gc.select_out_files(paths[:8], "stem") == [(p.name, [p]) for p in paths[:8]]


def test_a_missing_test_file_is_reported_not_run(tmp_path):
    steps = [_step("absent", "print('never')", requires=("tests/no_such_test_file.py",))]
    rc, out, summary, check = _run(tmp_path, steps)
    assert rc == 1 and summary["steps"][0]["status"] == "missing"
    assert "MISSING tests/no_such_test_file.py" in out
    assert "never" not in check.record_path(steps[0]).read_text().splitlines()


def test_without_a_gpu_a_real_run_skips_gpu_steps_and_fails(tmp_path):
    steps = [_step("cpu", "pass"), _step("gpu", "print('ran')", needs_gpu=True)]
    rc, out, summary, _ = _run(tmp_path, steps, has_gpu=False)
    assert rc == 1 and [r["status"] for r in summary["steps"]] == ["ok", "skipped"]
    assert "no GPU: nothing was checked on a device" in out


def test_a_failed_install_skips_what_needs_the_package(tmp_path):
    log = tmp_path / "install.txt"
    log.write_text("ERROR: No matching distribution found for torch\n")
    steps = [_step("device", "print('recorded')"), _step("tests", "pass", needs_install=True)]
    rc, out, summary, _ = _run(tmp_path, steps, install_rc=1, install_log=log, has_gpu=False)
    assert rc == 1 and [r["status"] for r in summary["steps"]] == ["ok", "skipped"]
    assert summary["install"]["status"] == "failed" and "No matching distribution" in out


FAKE_SANITIZER = """#!/bin/sh
# compute-sanitizer --tool T --error-exitcode N --print-limit N TARGET...: runs TARGET, then sums up like the real one
shift 6
"$@"; rc=$?
echo "========= ERROR SUMMARY: ${FAKE_ERRORS:-0} errors"
exit $rc
"""


@pytest.mark.parametrize("errors, target_rc, expect", [(0, 0, 0), (2, 0, 1), (0, 1, 1)])
def test_sanitize_runs_both_tools_and_needs_zero_errors(tmp_path, monkeypatch, capsys, errors, target_rc, expect):
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ERRORS", str(errors))
    rc = gc.sanitize(30, target=[PY, "-c", f"print('target ran'); raise SystemExit({target_rc})"])
    out = capsys.readouterr().out
    assert rc == expect, out
    assert out.splitlines().count("target ran") == 3  # warm-up, memcheck, synccheck
    for tool in gc.SANITIZER_TOOLS:
        assert f"## {tool}: ERROR SUMMARY {errors} errors" in out


def test_sanitize_without_the_tool_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gc, "find_sanitizer", lambda: None)
    assert gc.sanitize(20, target=[PY, "-c", "pass"]) == 1
    assert "compute-sanitizer not found" in capsys.readouterr().out


@pytest.mark.parametrize("text, errors", [("========= ERROR SUMMARY: 0 errors\n", 0),
                                          ("x\n========= ERROR SUMMARY: 1 error\n", 1),
                                          ("ERROR SUMMARY: 0 errors\nERROR SUMMARY: 12 errors", 12),
                                          ("the target crashed before the sanitizer summed up", None)])
def test_error_summary(text, errors):
    assert gc.error_summary(text) == errors


def test_a_step_gets_the_time_it_is_killed_at_and_its_json_records_travel(tmp_path):
    # "{deadline}": the measurement step ends its own cases before the kill; its "-perf.json" goes to $OUT.
    # (no braces in the code: the step's arguments go through str.format)
    code = ("import sys, json, time; d = float(sys.argv[1]); print('seconds', 'left:', round(d - time.time())); "
            "open(sys.argv[2], 'w').write(json.dumps(dict(d=d)))")
    steps = [gc.Step("perf", "step perf", (PY, "-c", code, "{deadline}", "{stem}-perf.json"), 20, needs_gpu=False,
                     needs_install=False)]
    out_dir = tmp_path / "out"
    rc, _, summary, check = _run(tmp_path, steps, out_dir=out_dir)
    assert rc == 0
    said = [ln for ln in check.record_path(steps[0]).read_text().splitlines() if ln.startswith("seconds left:")]
    left = int(said[0].split(":")[1])
    assert 15 <= left <= 20
    assert f"gpu-check-{STAMP}-perf.json" in os.listdir(out_dir)
