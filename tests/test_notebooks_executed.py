"""Every chapter notebook is stored executed, top to bottom, with outputs that fit any machine.

`pytest --nbval` compares each stored output with a fresh run, but it never compares a cell that
was not executed, so an unexecuted notebook would pass it trivially. These checks close that gap
and keep machine-specific text (paths, host name, memory addresses) out of the stored outputs,
which the book shows and nbval compares on other machines.

Fix a failure with `make execute` (re-runs every notebook and stores its outputs); for a path or
address, change the cell so it does not print it.
"""

import re
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def chapter_notebooks() -> list[Path]:
    """Notebooks under book/: git's tracked and not-ignored new ones, or a glob without git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "book/*.ipynb"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        paths = [ROOT / line for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        paths = list((ROOT / "book").rglob("*.ipynb"))
    return sorted({p for p in paths if p.is_file() and ".ipynb_checkpoints" not in p.parts})


NOTEBOOKS = chapter_notebooks()
IDS = [p.relative_to(ROOT).as_posix() for p in NOTEBOOKS]

# Text that ties an output to one machine. Host names shorter than 4 characters (such as `vm`)
# would match ordinary words, so they are not searched for.
_FIXED_PATHS = ["/work/", "/root/", "/home/", "/tmp/", "/Users/"]
_MACHINE_PATHS = {str(ROOT), str(Path.home()), sys.prefix, sys.base_prefix}
_HOSTS = {h for h in {socket.gethostname(), socket.gethostname().split(".")[0]} if len(h) >= 4 and h != "localhost"}
MACHINE_TEXT = [(f"absolute path {p!r}", re.compile(re.escape(p))) for p in _FIXED_PATHS]
MACHINE_TEXT += [
    (f"this machine's path {p!r}", re.compile(re.escape(p) + r"(?![\w.-])"))
    for p in sorted(_MACHINE_PATHS)
    if len(p) > 1 and not any((p + "/").startswith(f) for f in _FIXED_PATHS)
]
MACHINE_TEXT += [
    ("Windows path", re.compile(r"\b[A-Za-z]:\\")),
    ("memory address", re.compile(r"0x[0-9a-fA-F]{8,}")),
]
MACHINE_TEXT += [(f"host name {h!r}", re.compile(rf"\b{re.escape(h)}\b")) for h in _HOSTS]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BINARY_MIMES = ("image/png", "image/jpeg", "image/gif", "application/pdf")


def code_cells(nb):
    """(index, cell) of the non-empty code cells, in order."""
    return [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()]


def marked_as_raising(cell) -> bool:
    """True if nbval expects this cell to raise (comment marker or cell tag)."""
    tags = set(cell.get("metadata", {}).get("tags", []))
    return "NBVAL_RAISES_EXCEPTION" in cell.source or bool(tags & {"raises-exception", "nbval-raises-exception"})


def output_texts(output):
    """The text of one output that a reader sees (binary images left out)."""
    if output.output_type == "stream":
        yield output.get("text", "")
    elif output.output_type == "error":
        yield _ANSI.sub(
            "", "\n".join([output.get("ename", ""), output.get("evalue", ""), *output.get("traceback", [])])
        )
    else:
        for mime, value in output.get("data", {}).items():
            if mime not in _BINARY_MIMES:
                yield value if isinstance(value, str) else str(value)


def read(path: Path):
    return nbformat.read(path, as_version=4)


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebook found under {ROOT / 'book'}: the checks below test nothing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_code_cell_was_executed(path):
    nb = read(path)
    missing = [i for i, c in code_cells(nb) if c.execution_count is None]
    assert not missing, f"{path.name}: code cells {missing} (0-based) were never executed; run `make execute`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_executed_top_to_bottom_in_one_run(path):
    nb = read(path)
    counts = [c.execution_count for _, c in code_cells(nb)]
    expected = list(range(1, len(counts) + 1))
    assert counts == expected, (
        f"{path.name}: execution counts {counts}, expected {expected} "
        "(one fresh run, top to bottom); run `make execute`"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_error_outputs(path):
    nb = read(path)
    errors = [
        f"cell {i}: {o.get('ename')}: {o.get('evalue')}"
        for i, c in code_cells(nb)
        if not marked_as_raising(c)
        for o in c.outputs
        if o.output_type == "error"
    ]
    assert not errors, (
        f"{path.name} stores errors (mark a cell that must raise with "
        "`# NBVAL_RAISES_EXCEPTION` and the `raises-exception` tag):\n" + "\n".join(errors)
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_machine_specific_text_in_outputs(path):
    nb = read(path)
    found = []
    for i, cell in code_cells(nb):
        for output in cell.outputs:
            for text in output_texts(output):
                for what, pattern in MACHINE_TEXT:
                    m = pattern.search(text)
                    if m:
                        line = text[text.rfind("\n", 0, m.start()) + 1 :].split("\n", 1)[0]
                        found.append(f"cell {i}: {what} in {line.strip()[:120]!r}")
    assert not found, (
        f"{path.name}: outputs carry text of this machine (print relative paths, "
        "catch an exception and print its message instead of a traceback, "
        "do not print object reprs with addresses):\n" + "\n".join(found)
    )


# What JupyterLab writes into a notebook when it opens it with ipykernel's python3 kernel. A stored
# notebook that differs is marked modified the moment a learner opens it.
JUPYTERLAB_KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
KERNEL_LANGUAGE_INFO = {
    "codemirror_mode",
    "file_extension",
    "mimetype",
    "name",
    "nbconvert_exporter",
    "pygments_lexer",
    "version",
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_metadata_is_what_jupyterlab_writes(path):
    meta = read(path).metadata
    assert dict(meta.get("kernelspec", {})) == JUPYTERLAB_KERNELSPEC, (
        f"{path.name}: kernelspec {dict(meta.get('kernelspec', {}))}; run `make execute`"
    )
    info = meta.get("language_info", {})
    assert set(info) == KERNEL_LANGUAGE_INFO and info["name"] == "python", (
        f"{path.name}: language_info {dict(info)} is not what the kernel reports; run `make execute`"
    )


def test_jupyterlab_would_write_that_kernelspec():
    """The expected kernelspec above is the installed ipykernel's, not a guess."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert {"display_name": spec.display_name, "language": spec.language, "name": "python3"} == JUPYTERLAB_KERNELSPEC
