"""bench/ is a package run as `python -m bench.<family>.<name>`: no sys.path edits, imports of
its own modules by their package name, one README row per runnable benchmark, and the GPU check
still finds `rollover` on a machine where it is not installed."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
MODULES = sorted(p for p in BENCH.rglob("*.py") if "results" not in p.parts)


def test_no_sys_path_edits_and_own_modules_imported_by_package_name():
    stems = {p.stem for p in MODULES} - {"__init__"}
    for path in MODULES:
        source = path.read_text()
        assert "sys.path" not in source, path
        for node in ast.walk(ast.parse(source)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                assert name.split(".")[0] not in stems, f"{path}: `{name}` (import it as bench.…)"


def test_every_folder_is_a_package():
    folders = {p.parent for p in MODULES}
    assert folders - {BENCH} and all((folder / "__init__.py").is_file() for folder in folders)


def test_every_runnable_benchmark_has_its_readme_row():
    readme = (BENCH / "README.md").read_text()
    runnable = [p for p in MODULES if 'if __name__ == "__main__":' in p.read_text()]
    assert len(runnable) >= 13
    for path in runnable:
        relative = path.relative_to(BENCH)
        module = ".".join(("bench", *relative.with_suffix("").parts))
        row = next((line for line in readme.splitlines() if f"`{relative.as_posix()}`" in line), None)
        assert row is not None and f"python -m {module}" in row, relative


def test_gpu_check_imports_rollover_from_the_checkout_when_not_installed():
    # `python -S` with site-packages on PYTHONPATH: torch and the rest importable, but the .pth files
    # of the editable install are not read, so `rollover` is not installed, as on a lent machine.
    code = ("from bench.gpu import gpu_check\n"
            "gpu_check.import_rollover()\n"
            "import rollover.trainer.precision as precision\n"
            "print(precision.__file__)\n")
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    blocked = subprocess.run([sys.executable, "-S", "-c", "import torch, rollover"], capture_output=True,
                             text=True, cwd=ROOT, env=env, timeout=120)
    assert blocked.returncode != 0 and "No module named 'rollover'" in blocked.stderr
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()) == ROOT / "trainer" / "precision.py"
