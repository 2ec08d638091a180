"""The benchmark scripts run as ``python benchmarks/<name>.py``, which puts ``benchmarks/``
first on ``sys.path``: a script named like a top-level module of an installed package
shadows it for everything that script imports (transformers 5.25 imports the ``kernels``
package, which a ``benchmarks/kernels.py`` replaced)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_no_benchmark_script_shadows_an_installed_module():
    installed = importlib.metadata.packages_distributions()  # top-level module -> distributions
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert "mhc_kernels" in scripts and "train_step" in scripts
    clashes = {name: installed[name] for name in scripts if name in installed}
    assert not clashes, f"benchmark scripts named like installed modules (rename them): {clashes}"
