"""ldm_core is pure PyTorch math: it must never import Ray, MLflow, storage or CLI libraries. And a local Ray's
workers run the driver's own checkout of `pipelines`."""

import ast
import os
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


def test_a_local_rays_workers_run_the_drivers_checkout(tmp_path):
    """Two checkouts sharing one venv (installed editable from this one): a driver run from the other checkout must
    have its Ray workers import that checkout's `pipelines`, not the installed one. A worker imports `pipelines`
    first for its setup hook, before any driver path reaches it; init_ray puts the driver's checkout on the
    PYTHONPATH that a local Ray's processes inherit."""
    import shutil

    other = tmp_path / "other-checkout"
    for package in ("pipelines", "ldm_core"):
        shutil.copytree(REPO / package, other / package, ignore=shutil.ignore_patterns("__pycache__"))
    driver = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import ray\n"
        "from pipelines.config.sections import RaySection\n"
        "from pipelines.platform.runtime import init_ray\n"
        "init_ray(RaySection(num_cpus=1))\n"
        "def where():\n"
        "    import pipelines.platform.runtime as r\n"
        "    return r.__file__\n"
        "@ray.remote(num_cpus=0)\n"
        "class Probe:\n"
        "    def where(self):\n"
        "        return where()\n"
        "print('driver', where())\n"
        "print('task', ray.get(ray.remote(num_cpus=0)(where).remote()))\n"
        "print('actor', ray.get(Probe.remote().where.remote()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", driver, str(other)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.split(" ", 1)[0] in ("driver", "task", "actor"))
    expected = str(other / "pipelines" / "platform" / "runtime.py")
    assert seen == {"driver": expected, "task": expected, "actor": expected}, out.stdout
