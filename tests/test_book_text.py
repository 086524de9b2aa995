"""The text names only chapters that exist, or the planned ones the intro lists.

"Chapter N" (also "chapters 4 and 5", "chapters 2, 8 and 11") is looked for in the book's text (the
intro, every notebook cell, code comments included), the README, the package's docstrings and
comments, and the tests. A chapter exists when `book/NN_*.ipynb` does; the planned chapters are
listed once, in the intro's chapter map, as rows marked "(planned)".
"""

import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
MENTION = re.compile(r"\b[Cc]hapters?\s+((?:\d+(?:\s*(?:,\s*and|,|and|or|to|-|–)\s*)?)+)")
PLANNED_ROW = re.compile(r"^\|[^|]*\|\s*(\d+)\.[^|]*\(planned\)\s*\|", re.M)


def existing_chapters() -> set[int]:
    return {int(p.name[:2]) for p in (ROOT / "book").glob("[0-9][0-9]_*.ipynb")}


def planned_chapters() -> set[int]:
    return {int(n) for n in PLANNED_ROW.findall((ROOT / "book" / "intro.md").read_text())}


def mentioned(text: str):
    """(chapter number, a few words around it) for every chapter the text names."""
    for m in MENTION.finditer(text):
        for n in re.findall(r"\d+", m.group(1)):
            yield int(n), text[max(0, m.start() - 40) : m.end() + 20].replace("\n", " ")


def texts():
    """(where, text) for everything a reader or contributor reads."""
    yield "book/intro.md", (ROOT / "book" / "intro.md").read_text()
    yield "README.md", (ROOT / "README.md").read_text()
    for path in sorted((ROOT / "book").glob("*.ipynb")):
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            yield f"{path.name} cell {i}", cell.source
    for folder in ("src", "tests", "examples", "tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != Path(__file__).resolve():
                yield str(path.relative_to(ROOT)), path.read_text()


def test_the_planned_chapters_follow_the_existing_ones():
    existing, planned = existing_chapters(), planned_chapters()
    assert existing, "found no chapters: the test below tests nothing"  # planned ones may be none (all written)
    assert not existing & planned, f"chapters {sorted(existing & planned)} exist: drop '(planned)' from the intro"
    # numbers are fixed (the text points to them), so a later chapter may land first; no gaps, though
    gaps = set(range(max(existing | planned) + 1)) - existing - planned
    assert not gaps, f"chapters {sorted(gaps)} neither exist nor are planned: the numbers must run without gaps"
    assert min(planned, default=11) > 10, f"planned chapters {sorted(planned)}: only Part IV's (11 on) may be planned"


def test_every_chapter_named_exists_or_is_planned():
    known = existing_chapters() | planned_chapters()
    unknown = [
        f"{where}: chapter {n} in '...{context}...'"
        for where, text in texts()
        for n, context in mentioned(text)
        if n not in known
    ]
    assert not unknown, "chapters that neither exist nor are planned:\n" + "\n".join(unknown)


def test_the_pattern_finds_every_form():
    text = "see chapter 3, chapters 4 and 5, Chapters 2, 8, and 11, chapters 6-7 and chapter 10's."
    assert [n for n, _ in mentioned(text)] == [3, 4, 5, 2, 8, 11, 6, 7, 10]


ROUTE_ITEM = re.compile(r"^\d+\. (.*?)(?=^\d+\. |^\s*$)", re.M | re.S)


def route_sections():
    """(chapter, section title) for every *section* the intro's afternoon route names after a chapter."""
    intro = (ROOT / "book" / "intro.md").read_text()
    route = intro.split("## A first read", 1)[1].split("\n## ", 1)[0]
    for item in ROUTE_ITEM.findall(route + "\n\n"):
        chapter = None
        for doc, title in re.findall(r"\{doc\}`([^`]+)`|\*([^*]+)\*", item.replace("\n   ", " ")):
            chapter = doc or chapter
            if title:
                yield chapter, title


def test_the_afternoon_route_names_sections_that_exist():
    pairs = list(route_sections())
    assert len(pairs) >= 5, pairs
    missing = []
    for chapter, title in pairs:
        path = ROOT / "book" / f"{chapter}.ipynb"
        headings = {
            line.lstrip("#").strip()
            for cell in nbformat.read(path, as_version=4).cells
            if cell.cell_type == "markdown"
            for line in cell.source.splitlines()
            if line.startswith("#")
        }
        headings = {h.replace("`", "") for h in headings}
        if title.replace("`", "") not in headings:
            missing.append(f"{chapter}: *{title}*")
    assert not missing, "the route names sections that are not headings of their chapter:\n" + "\n".join(missing)


README_BENCH_ROWS = {  # the README's benchmark table: label -> the stored run's variant key
    "ours, vocabulary-parallel head, gloo": "ours_vocab",
    "ours, vocabulary-parallel head, shared memory": "ours_vocab_shm",
    "PyTorch TP, vocabulary-parallel head, `loss_parallel`, gloo": "torch_vocab",
    "PyTorch TP, the same, shared memory": "torch_vocab_shm",
}


def test_the_readme_quotes_the_stored_benchmark_run():
    """Every ratio in the README's benchmark table is the stored run's (book/data/bench_2cpu.json), rounded."""
    import json

    rows = {
        (r["size"], r["key"]): r for r in json.loads((ROOT / "book" / "data" / "bench_2cpu.json").read_text())["rows"]
    }
    readme = (ROOT / "README.md").read_text()
    for label, key in README_BENCH_ROWS.items():
        line = next(line for line in readme.splitlines() if line.startswith(f"| {label} |"))
        quoted = [float(x) for x in line.strip("|").split("|")[1:]]
        stored = [rows[(s, key)][f"{ph}/dense"] for s in ("mid", "gpt2") for ph in ("fwd", "step")]
        assert quoted == [round(x, 2) for x in stored], (label, quoted, stored)
