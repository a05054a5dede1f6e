"""Packaging (issue 14): no package folder named like a build output, the deprecated `flashmoe_py.dist` alias, the
distribution name."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD_OUTPUT_NAMES = {"dist", "build", "_build", "site-packages"}  # what ignore templates and ruff's excludes skip


def _setup_packages() -> list[str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "packages" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no `packages = [...]`")


def test_no_package_folder_is_named_like_a_build_output():
    for top in ("flashmoe_py", "kernels"):
        for root, dirs, _ in os.walk(REPO / top):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            bad = BUILD_OUTPUT_NAMES.intersection(dirs)
            assert not bad, f"{Path(root).relative_to(REPO)}/{sorted(bad)[0]}: a build-output folder name"
    assert (REPO / "flashmoe_py" / "parallel" / "__init__.py").is_file()


def test_setup_lists_every_package_folder():
    found = {".".join(Path(root).relative_to(REPO).parts) for root, _, files in os.walk(REPO / "flashmoe_py")
             if "__init__.py" in files}
    assert found <= set(_setup_packages()), sorted(found - set(_setup_packages()))


def test_gitignore_needs_no_special_case_for_a_package_folder():
    lines = [ln.strip() for ln in (REPO / ".gitignore").read_text().splitlines()]
    assert "dist/" in lines and "build/" in lines  # the templates' unanchored forms: nothing of ours matches them


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_old_dist_names_are_the_parallel_modules_with_a_deprecation_warning():
    code = """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import flashmoe_py.dist.shm as old_shm
    from flashmoe_py.dist import ExpertParallel, init_process_group
    from flashmoe_py.dist.layout import HeapLayout
import flashmoe_py
import flashmoe_py.parallel as new
import flashmoe_py.parallel.layout
import flashmoe_py.parallel.shm
assert flashmoe_py.dist is new and old_shm is new.shm, (flashmoe_py.dist, old_shm)
assert ExpertParallel is new.ExpertParallel and init_process_group is new.init_process_group
assert HeapLayout is new.layout.HeapLayout and HeapLayout.__module__ == "flashmoe_py.parallel.layout"
import sys
assert sys.modules["flashmoe_py.dist.shm"] is sys.modules["flashmoe_py.parallel.shm"]
dep = [w for w in caught if issubclass(w.category, DeprecationWarning) and "flashmoe_py.dist" in str(w.message)]
names = sorted(str(w.message).split()[0] for w in dep)
assert names == ["flashmoe_py.dist", "flashmoe_py.dist.layout", "flashmoe_py.dist.shm"], names
assert all(w.filename == "<string>" for w in dep), [w.filename for w in dep]  # points at the importing line
assert "import flashmoe_py.parallel" in str(dep[0].message)
print("ok")
"""
    r = _python(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_old_dist_name_fails_under_warnings_as_errors_and_new_name_is_silent():
    r = _python("import flashmoe_py.dist", "-W", "error::DeprecationWarning")
    assert r.returncode != 0 and "DeprecationWarning: flashmoe_py.dist is deprecated" in r.stderr, r.stderr
    r = _python("import flashmoe_py.parallel.shm, flashmoe_py.parallel.launch", "-W", "error::DeprecationWarning")
    assert r.returncode == 0, r.stderr


def test_attribute_access_to_the_old_name_warns_too():
    r = _python("import warnings, flashmoe_py\nwith warnings.catch_warnings(record=True) as w:\n"
                "    warnings.simplefilter('always'); p = flashmoe_py.dist\n"
                "import flashmoe_py.parallel\nassert p is flashmoe_py.parallel\n"
                "assert any(issubclass(x.category, DeprecationWarning) for x in w)\n"
                "try:\n    flashmoe_py.no_such_thing\nexcept AttributeError as e:\n    print('ok', e)\n")
    assert r.returncode == 0 and r.stdout.startswith("ok") and "no_such_thing" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("module", ["flashmoe_py.distx", "flashmoe_py.distributed"])
def test_alias_answers_only_the_old_names(module):
    r = _python(f"import {module}")
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr and re.search(module, r.stderr), r.stderr


def _pyproject(key: str) -> str:
    project = (REPO / "pyproject.toml").read_text().split("[project]", 1)[1].split("\n[", 1)[0]
    return re.search(rf'^{key}\s*=\s*"([^"]+)"', project, re.M).group(1)


def _normalised(name: str) -> str:  # PEP 503
    return re.sub(r"[-_.]+", "-", name).lower()


def test_distribution_name_does_not_collide_with_flashmoes_package():
    # FlashMoE's own package is `flashmoe-py` (import name `flashmoe`); a distribution that normalises to the same
    # name replaces its metadata on install. The import name stays flashmoe_py.
    name = _pyproject("name")
    assert _normalised(name) not in ("flashmoe-py", "flashmoe"), name
    assert name == "flashmoe-triton"
    assert "`flashmoe-triton`" in (REPO / "docs" / "DECISIONS.md").read_text()
    assert "**`flashmoe-triton`**" in (REPO / "README.md").read_text()


def test_bench_reports_our_version_from_the_package_not_from_flashmoes_metadata(monkeypatch):
    import flashmoe_py
    from flashmoe_py.bench import schema

    assert _pyproject("version") == flashmoe_py.__version__
    real = schema.metadata.version

    def version(pkg):  # as in an environment that also has FlashMoE's flashmoe-py 0.1.2 installed
        return "0.1.2" if _normalised(pkg) == "flashmoe-py" else real(pkg)
    monkeypatch.setattr(schema.metadata, "version", version)
    assert schema.versions()["flashmoe_py"] == flashmoe_py.__version__


def test_gpu_check_looks_up_our_distribution_by_its_name(monkeypatch):
    from flashmoe_py import gpu_check as gc

    asked = []
    monkeypatch.setattr(gc, "_version", lambda dist: asked.append(dist) or "x")
    monkeypatch.setattr(gc, "_tool_version", lambda *a, **k: "absent")
    gc.device_info()
    assert "flashmoe-triton" in asked and not any(_normalised(d) == "flashmoe-py" for d in asked), asked


def test_readme_backend_table_lists_exactly_the_registered_backends():
    from flashmoe_py import backends

    lines = (REPO / "README.md").read_text().split("| backend | device | status |", 1)[1].splitlines()[2:]
    names = tuple(re.match(r"\| `([a-z_]+)` \|", ln).group(1) for ln in lines[:lines.index("")])
    assert names == backends.BACKEND_NAMES, names
