"""The notebooks: stored without outputs, and run top to bottom on the tiny setting."""

import json
import os
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
MISSING = "not installed (pip install -e '.[test]')"
nbformat = pytest.importorskip("nbformat", reason=f"nbformat {MISSING}")
nbclient = pytest.importorskip("nbclient", reason=f"nbclient {MISSING}")


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebooks_are_stored_without_outputs(path):
    notebook = json.loads(path.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, path.name


def _execute(name: str, workdir: Path, **environment: str) -> None:
    """Run the notebook top to bottom in a kernel whose environment adds `environment`."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    previous = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        nbclient.NotebookClient(
            notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": workdir}}
        ).execute()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def test_the_quickstart_then_the_dynamics_notebook_run_on_the_tiny_setting(tmp_path):
    output = tmp_path / "quickstart_out"
    _execute("quickstart", tmp_path, SELFCLEANSE_SIZE="tiny", SELFCLEANSE_OUTPUT=str(output))
    rows = json.loads((output / "demo_results.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["baseline", "filter", "selfcleanse", "oracle"]
    assert (output / "paper-b_selfcleanse" / "report" / "losses.png").is_file()
    _execute("noise_dynamics", tmp_path, SELFCLEANSE_RUN=str(output / "paper-b_selfcleanse"))
