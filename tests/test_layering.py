"""ldm_core is pure PyTorch math: it must never import Ray, MLflow, storage or CLI libraries."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"ray", "mlflow", "s3fs", "fsspec", "pyarrow", "boto3", "argparse", "pipelines"}


def test_ldm_core_sources_import_nothing_forbidden():
    offenders = []
    for path in sorted((REPO / "ldm_core").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_importing_ldm_core_loads_no_ray_or_mlflow():
    code = (
        "import sys, importlib, pkgutil, ldm_core\n"
        "for m in pkgutil.iter_modules(ldm_core.__path__): importlib.import_module('ldm_core.' + m.name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in {'ray', 'mlflow', 's3fs', 'pyarrow', 'pipelines'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_bad_command_line_or_config_is_refused_before_torch_ray_or_mlflow_import():
    """Issue 30: the front of every entry point (`pipelines.config`, `platform/cli.py`) and `run.py` up to its config
    check are light, so a typo is refused at once, not after seconds of imports. Run as users run it."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['pipelines/run.py', '--config', 'configs/quickstart.yaml', '--set', 'stage_a.train.max_stepz=3']\n"
        "try:\n"
        "    runpy.run_path('pipelines/run.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print(e.code)\n"
        "print('heavy:', ','.join(sorted({k.split('.')[0] for k in sys.modules} & {'torch', 'ray', 'mlflow', 'numpy'})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    refusal, heavy = out.stdout.rstrip('\n').split('\n')
    assert refusal.startswith("error: invalid config") and "stage_a.train.max_stepz" in refusal
    assert heavy == "heavy: "


def test_the_modules_ray_data_processes_import_leave_torch_out():
    """Every Ray process that decodes shards, reads latents, plans a read (SplitCoordinator) or counts skips imports
    these modules; torch's import costs each of them seconds of CPU, which a 2-core box pays per stage."""
    code = ("import sys, pipelines.data, pipelines.data.reader, pipelines.data.latents\n"
            "print(','.join(sorted(k for k in sys.modules if k.split('.')[0] in {'torch', 'torchvision', 'transformers'})))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# pipelines/ is layered: each package may import its own layer and the ones below it, never one above; the entry
# points on top (pipelines/*.py) import anything below. README "Where things live" names the same order.
LAYERS = ("config", "platform", "data", "models", "train", "dag")


def _layer(module: str) -> int:
    package = module.split(".")[1]
    return LAYERS.index(package) if package in LAYERS else len(LAYERS)  # else: pipelines.<entry point>


def _pipeline_imports() -> dict[str, set[str]]:
    """Every pipelines module -> the pipelines modules it imports anywhere in its body (lazy imports inside
    functions too; `if TYPE_CHECKING:` blocks left out: annotations only)."""
    graph: dict[str, set[str]] = {}
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
               for p in (REPO / "pipelines").rglob("*.py")}
    for path in sorted((REPO / "pipelines").rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text(), filename=str(path))
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for child in node.body for n in ast.walk(child)}
        found = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name and m != "pipelines"}
    return graph


def test_pipelines_packages_import_only_their_own_layer_or_lower():
    graph = _pipeline_imports()
    assert len(graph) > 30, "the walk found the package"
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.count(".") > 1 or m == "pipelines"
                    for d in deps if _layer(d) > _layer(m))
    assert upward == []
    assert not [m for m in graph if m.count(".") == 1 and m.split(".")[1] not in LAYERS and not (REPO / f"{m.replace('.', '/')}.py").is_file()]


def test_pipelines_has_no_import_cycle():
    graph = _pipeline_imports()
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]) if dep in path else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_pipelines_top_level_holds_only_entry_points_and_subpackages():
    """`ls pipelines/` is the DAG's nodes and CLIs: every top-level module is run as a script."""
    top = sorted(p.name for p in (REPO / "pipelines").glob("*.py") if p.name != "__init__.py")
    not_scripts = [name for name in top if 'if __name__ == "__main__":' not in (REPO / "pipelines" / name).read_text()]
    assert not_scripts == []
    assert sorted(p.name for p in (REPO / "pipelines").iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)
