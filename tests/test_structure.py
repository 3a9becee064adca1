"""The structure the design asks for, checked on the source: the domain packages take tensors and
dataclasses (no Hydra, omegaconf or wandb), run-dir file names live in eenn/rundir.py alone, and
nobody outside eenn/policies checks a policy's name."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eenn.policies import POLICIES

EENN = Path(__file__).resolve().parents[1] / "eenn"
DOMAIN = ("policies", "inference", "evaluation", "models", "deploy", "training", "data")
JOB_LIBRARIES = ("hydra", "omegaconf", "wandb")


def _modules(*packages: str) -> list[Path]:
    roots = [EENN / p for p in packages] if packages else [EENN]
    return sorted(f for root in roots for f in root.rglob("*.py"))


def _imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", DOMAIN)
def test_domain_packages_import_no_job_library(package: str) -> None:
    offenders = {
        str(f.relative_to(EENN)): sorted(_imported(ast.parse(f.read_text())) & set(JOB_LIBRARIES))
        for f in _modules(package)
    }
    assert {f: libs for f, libs in offenders.items() if libs} == {}


def test_policies_depend_on_torch_alone() -> None:
    # a learned scheduler is a plain torch loop, not a Trainer inside a policy
    offenders = {
        str(f.relative_to(EENN)): sorted(
            _imported(ast.parse(f.read_text())) & {"lightning", "pytorch_lightning", *JOB_LIBRARIES}
        )
        for f in _modules("policies")
    }
    assert {f: libs for f, libs in offenders.items() if libs} == {}


def test_importing_the_domain_packages_loads_no_hydra_or_omegaconf() -> None:
    # wandb is left out: timm imports it for its own logging
    code = (
        "import sys; import eenn.policies, eenn.inference.edge_cloud, eenn.inference.report, eenn.evaluation.plots, "
        "eenn.evaluation.report, eenn.models, eenn.deploy.export; print(sorted(m for m in ('hydra', 'omegaconf') if m "
        "in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"


# file names of run dirs, as code spells them: in strings and joined paths
RUN_DIR_NAMES = re.compile(
    r"metrics\.json|costs\.json|policy\.safetensors|error\.json|infer\.json|results\.csv|results_by_group\.csv|report\.html|\.ckpt\b"
    r"|[\"'/]\.hydra\b|/ \"(predictions|checkpoints)\"|\"(predictions|checkpoints)/"
)


#: the modules that own a file format: run dirs, the deployment bundle (whose policy.safetensors
#: is its own, read with numpy) and the model dir of save_pretrained (its own costs.json, metrics.json)
FORMAT_MODULES = ("rundir.py", "deploy/bundle.py", "api.py")


def test_run_dir_file_names_are_spelled_in_the_run_dir_module_only() -> None:
    # the benchmarks too: a script that spells a file by hand breaks when the layout changes
    files = [*_modules(), *sorted((EENN.parent / "benchmarks").rglob("*.py"))]
    found = [
        f"{f.relative_to(EENN.parent)}:{i}: {line.strip()}"
        for f in files
        if str(f.relative_to(EENN.parent)) not in {f"eenn/{m}" for m in FORMAT_MODULES}
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if RUN_DIR_NAMES.search(line)
    ]
    assert found == []


def _name_checks(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines that compare a policy (``policy``, ``.name``, ``["policy"]``...) with a registered
    policy's name: ==, !=, in, startswith, endswith."""

    def named(node: ast.AST, part: bool = False) -> bool:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value in names or (part and len(node.value) > 2 and any(node.value in n for n in names))
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(named(e, part) for e in node.elts)

    def a_policy(node: ast.AST) -> bool:
        text = ast.unparse(node)
        return "policy" in text or text.endswith(".name")

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(named(c) for c in sides) and any(a_policy(c) for c in sides):
                lines.append(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and a_policy(node.func.value)
            and node.func.attr in ("startswith", "endswith")
            and any(named(a, part=True) for a in node.args)
        ):
            lines.append(node.lineno)
    return lines


def test_no_policy_name_checks_outside_the_policies_package() -> None:
    names = set(POLICIES.names())
    found = {
        str(f.relative_to(EENN)): lines
        for f in _modules()
        if "policies" not in f.relative_to(EENN).parts
        if (lines := _name_checks(ast.parse(f.read_text()), names))
    }
    assert found == {}


def test_the_name_check_finder_finds_the_checks_it_is_for() -> None:
    code = (
        'a = p.name == "deex"\nb = r["policy"] != "static"\nc = policy.startswith("oracle")\n'
        'd = policy in ("vote",)\ne = unit == "flops"\nf = "margin" in features'
    )
    assert _name_checks(ast.parse(code), set(POLICIES.names())) == [1, 2, 3, 4]


BENCHMARKS = EENN.parent / "benchmarks"
OVERRIDE_KEY = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.\-/@]*=$")


def _built_overrides(tree: ast.AST) -> list[int]:
    """Lines that build a Hydra override ``key=<value>`` from a value by hand: an f-string that is
    exactly ``key={...}``, ``"key=" + ...``, or ``"key={}".format(...)``."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and len(node.values) == 2:
            head, tail = node.values
            if (
                isinstance(head, ast.Constant)
                and OVERRIDE_KEY.match(str(head.value))
                and isinstance(tail, ast.FormattedValue)
            ):
                lines.append(node.lineno)
        elif (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Add)
            and isinstance(node.left, ast.Constant)
            and OVERRIDE_KEY.match(str(node.left.value))
        ):
            lines.append(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"
            and isinstance(node.func.value, ast.Constant)
            and re.match(r"^[\w.+~]+=\{\}$", str(node.func.value.value))
        ):
            lines.append(node.lineno)
    return lines


def test_overrides_built_from_values_go_through_the_quoting_helper() -> None:
    # a path's own = and , (a sweep job's dir) would be read as override syntax unquoted
    files = [*_modules(), *sorted(BENCHMARKS.rglob("*.py"))]
    found = {
        str(f): lines
        for f in files
        if f.name != "overrides.py"
        if (lines := _built_overrides(ast.parse(f.read_text())))
    }
    assert found == {}


def test_the_override_finder_finds_hand_built_overrides() -> None:
    code = (
        'a = f"run_dir={path}"\nb = "data.path=" + str(p)\nc = "policy_dir={}".format(d)\n'
        'd = f"run_dir={p!r} is not a directory"\ne = override("run_dir", p)\nf = f"+policy.x={v:.3f}"'
    )
    assert _built_overrides(ast.parse(code)) == [1, 2, 3, 6]


def _unit(module: str) -> str:
    """The layer a module belongs to: its top-level package, or the top-level module itself
    (``eenn.tasks.fit`` -> ``tasks``, ``eenn.rundir`` -> ``rundir``)."""
    return module.split(".")[1]


def _eenn_imports(path: Path) -> set[str]:
    """The eenn modules a file imports, at the top or inside functions (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("eenn.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("eenn."):
            out.add(node.module)
    return out


def _layer_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for f in _modules():
        rel = f.relative_to(EENN.parent).with_suffix("")
        if rel.name == "__init__" and len(rel.parts) == 2:
            continue  # eenn/__init__.py
        me = _unit(".".join(rel.parts))
        graph.setdefault(me, set()).update(u for u in map(_unit, _eenn_imports(f)) if u != me)
    return graph


def test_imports_between_eenn_layers_have_no_cycle() -> None:
    graph = _layer_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    cycles = [c for n in sorted(graph) if n not in state and (c := visit(n, []))]
    assert cycles == []


def test_training_does_not_sit_above_the_run_dir_objects() -> None:
    # training reads checkpoints (eenn.checkpoints); run dirs are the jobs' business
    graph = _layer_graph()
    assert "rundir" not in graph["training"] and "tasks" not in graph["training"]
    assert "tasks" not in graph["rundir"]
