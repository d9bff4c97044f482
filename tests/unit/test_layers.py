"""The one-way layering rule (docs/ARCHITECTURE.md, "Layering"), read off the source's imports.

Every `import rollover.x...` / `from rollover.x... import` in a product folder, at module level
or inside a function (a lazy import is still an arrow), must point at a package the importing
package may see:

    kernels <- algos <- tasks <- rollout <- swarm <- trainer (the composition root and the CLIs)

rollout never sees trainer or swarm; swarm sees only rollout's data types and tasks, except its
CLI modules, which are edges like trainer/.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kernels", "algos", "tasks", "rollout", "swarm", "trainer")
ALLOWED = {
    "kernels": {"kernels"},
    "algos": {"algos", "kernels"},
    "tasks": {"tasks", "algos", "kernels"},
    "rollout": {"rollout", "tasks", "algos", "kernels"},
    "swarm": {"swarm", "tasks", "rollout.types"},
    "trainer": set(PACKAGES),
}
EDGES = {"swarm/cli.py", "swarm/local.py"}  # `rl-swarm`: wires a node from a recipe, like trainer/


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, dotted name below `rollover.`) of every import of ours in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "rollover" else [f"rollover.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, name[len("rollover."):]) for name in names if name.startswith("rollover.")]
    return found


def allowed(package: str, target: str) -> bool:
    return any(target == rule or target.startswith(rule + ".") for rule in ALLOWED[package])


def violations() -> list[str]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative in EDGES:
                continue
            for line, target in imported_modules(path.read_text()):
                if not allowed(package, target):
                    out.append(f"{relative}:{line} imports rollover.{target}")
    return out


def test_imports_point_down_the_layers():
    assert violations() == []


def test_the_rule_reads_every_kind_of_import():
    """The reader above sees module-level, lazy, plain and from-package imports alike."""
    source = ("import rollover.trainer.loop\n"
              "from rollover.swarm import node\n"
              "from rollover import trainer\n"
              "def f():\n    from rollover.rollout.types import Group\n"
              "from rollover.rollout.engine import RolloutEngine\n")
    got = sorted(imported_modules(source))
    assert got == [(1, "trainer.loop"), (2, "swarm"), (3, "trainer"), (5, "rollout.types"), (6, "rollout.engine")]
    assert [allowed("swarm", target) for _, target in got] == [False, True, False, True, False]
    assert not allowed("rollout", "trainer.config") and allowed("trainer", "swarm.node")


def test_a_one_process_run_does_not_import_distributed_checkpoint():
    """torch.distributed.checkpoint costs ~1 s of every run's start-up; only N trainer ranks and
    a resume from their shards need it, and they import it where they use it."""
    import subprocess
    import sys

    code = ("import sys, rollover.trainer.run, rollover.trainer.cli\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch.distributed.checkpoint')))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.strip() == "[]"
