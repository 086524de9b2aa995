"""Execute chapter notebooks in place, top to bottom, the way the tests will re-run them.

Usage: python tools/execute_notebooks.py book/01_toy_all_reduce.ipynb [more.ipynb ...]

Each notebook runs in a fresh kernel with the notebook's folder as working directory; outputs and
ipywidgets state are stored (the HTML book renders widgets from that saved state). Metadata that
differs between machines (the kernel's Python patch version) is dropped so diffs stay clean.
"""
import sys
from pathlib import Path

import nbformat
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
    nb.metadata.get("language_info", {}).pop("version", None)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nbformat.write(nb, path)
    print(f"executed {path}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python tools/execute_notebooks.py NOTEBOOK.ipynb [...]")
    for arg in sys.argv[1:]:
        execute(Path(arg))
