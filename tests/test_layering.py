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
