"""Execute chapter notebooks in place, top to bottom, the way the tests will re-run them.

Usage: python tools/execute_notebooks.py book/01_toy_all_reduce.ipynb [more.ipynb ...]

Each notebook runs in a fresh kernel with the notebook's folder as working directory; outputs and
ipywidgets state are stored (the HTML book renders widgets from that saved state). The notebook's
kernelspec and language_info are stored as JupyterLab writes them when it opens the notebook with
ipykernel's `python3` kernel, so a learner's JupyterLab does not mark a notebook modified on
opening it (with the same Python version).
"""

import sys
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        store_widget_state=True,
    )
    client.execute()
    spec = KernelSpecManager().get_kernel_spec("python3")
    nb.metadata["kernelspec"] = {"display_name": spec.display_name, "language": spec.language, "name": "python3"}
    nbformat.write(nb, path)
    print(f"executed {path}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python tools/execute_notebooks.py NOTEBOOK.ipynb [...]")
    for arg in sys.argv[1:]:
        execute(Path(arg))
