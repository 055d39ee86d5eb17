"""Figures: plots.py draws with matplotlib's Figure objects, so it never touches a caller's backend or pyplot."""

import subprocess
import sys

from conftest import ROOT

# Every module of the project, as a notebook or a script would import it; benchmarks/ is a folder of scripts.
MODULES = sorted(path.stem for path in ROOT.glob("*.py")) + sorted(
    f"benchmarks.{path.stem}" for path in (ROOT / "benchmarks").glob("*.py")
)

KEEPS_THE_BACKEND = """
import sys
sys.path.insert(0, {root!r})
import matplotlib
matplotlib.use("svg")  # the caller's choice, as a notebook's inline backend or a GUI would be
import importlib
for name in {modules!r}:
    importlib.import_module(name)
    assert matplotlib.get_backend() == "svg", f"importing {{name}} switched the backend to {{matplotlib.get_backend()}}"
import plots
plots.plot_curves({{"cnn": [{{"epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "train_acc": 0.9, "val_acc": 0.92}}]}},
                  {path!r})
assert matplotlib.get_backend() == "svg", f"drawing switched the backend to {{matplotlib.get_backend()}}"
import matplotlib.pyplot as plt
assert plt.get_fignums() == [], "plots left figures open in pyplot, which a notebook would show"
print("ok")
"""


def test_importing_and_plotting_leave_the_callers_backend_alone(tmp_path):
    """Importing every project module, then drawing a figure, keeps the backend the caller chose, with no pyplot figure left."""
    assert {"train", "evaluate", "plots", "benchmarks.photos"} <= set(MODULES)
    code = KEEPS_THE_BACKEND.format(root=str(ROOT), modules=MODULES, path=str(tmp_path / "curves.png"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
