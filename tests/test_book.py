"""The book builds strictly, and every built page works offline in a real browser.

One module on purpose: under `pytest -n 2 --dist loadfile` its tests stay on one worker, so the
module-scoped `build` fixture builds the book once, before the browser opens any page.

The browser test serves `_build/html` on 127.0.0.1, opens each page in headless Debian Chromium
(driven by Playwright, never `playwright install`) and fails on: a failed request or an HTTP
error, any request that leaves 127.0.0.1 (it is also blocked), an uncaught page error, an image
that did not load, math left as raw TeX, a widget that did not render. Console messages are only
shown as context: the theme logs harmless ones (`Got invalid theme mode`, a favicon 404).
A full-page screenshot of each page is saved under `_build/screenshots/`.

The widgets are driven too: every control of chapters 1-6, 9 and 10 is moved through every
position and the shown text checked against what that choice implies (`book_widgets`), and
chapter 14's explorer is moved and checked against the cost model.
"""

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import book_widgets
import pytest
import yaml

pytestmark = pytest.mark.slow  # builds the book and drives a browser: not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SETTLE_MS = 15_000  # how long a page may take to typeset math and render widgets


def toc_pages() -> list[str]:
    """Every document in _toc.yml, as built page names (`book/intro`)."""
    names = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("root", "file"):
                if key in node:
                    names.append(Path(node[key]).with_suffix("").as_posix())
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load((ROOT / "_toc.yml").read_text()))
    return names


# The toc's pages plus Sphinx's own: index (a redirect to the first page), search, genindex.
PAGES = toc_pages() + ["index", "search", "genindex"]


# --- the build ---------------------------------------------------------------------------


def jupyter_book() -> str:
    """The jupyter-book script of the Python running the tests (the project's venv)."""
    script = Path(sys.executable).with_name("jupyter-book")
    return str(script) if script.exists() else shutil.which("jupyter-book") or "jupyter-book"


@pytest.fixture(scope="module")
def build():
    """Build the book once, strictly, from a clean `_build/html`, with the network cut off.

    The old output is removed first: Sphinx leaves stale files behind (a deleted vendored script
    would still be served). Proxies pointing at a closed local port make any fetch fail fast.
    """
    shutil.rmtree(HTML, ignore_errors=True)
    dead = "http://127.0.0.1:9"
    env = {
        **os.environ,
        "http_proxy": dead,
        "https_proxy": dead,
        "HTTP_PROXY": dead,
        "HTTPS_PROXY": dead,
        "ALL_PROXY": dead,
        "no_proxy": "",
        "NO_PROXY": "",
    }
    start = time.perf_counter()
    proc = subprocess.run(
        [jupyter_book(), "build", str(ROOT), "--all", "-W", "-n", "--keep-going"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    proc.seconds = time.perf_counter() - start
    return proc


@pytest.fixture(scope="module")
def site(build):
    """The built HTML folder; fails (not skips) the page tests when the build failed."""
    if build.returncode != 0 or not (HTML / "index.html").exists():
        pytest.fail("the book did not build; see test_book_builds_strictly")
    return HTML


def test_book_builds_strictly(build):
    log = (build.stdout + build.stderr)[-6000:]
    assert build.returncode == 0, f"`jupyter-book build . --all -W -n --keep-going` failed:\n{log}"
    print(f"strict build: {build.seconds:.1f} s")


def test_every_built_page_is_checked(site):
    built = {
        p.relative_to(site).with_suffix("").as_posix()
        for p in site.rglob("*.html")
        if p.relative_to(site).parts[0] != "_static"
    }
    assert built == set(PAGES), (
        f"pages built but not in the browser test: {built - set(PAGES)}; expected but not built: {set(PAGES) - built}"
    )


class _FetchedSources(HTMLParser):
    """Collects the URLs a page fetches by itself: script/img/iframe/... src and link href."""

    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "audio", "video", "embed"):
            if attrs.get("src"):
                self.urls.append(f"<{tag} src={attrs['src']}>")
        elif tag == "link" and attrs.get("href"):
            if attrs.get("rel") not in ("canonical", "alternate"):  # not fetched by the page
                self.urls.append(f"<link rel={attrs.get('rel')} href={attrs['href']}>")


def test_pages_fetch_nothing_from_outside(site):
    """A static look at every page: no script, style, font or image from another host."""
    outside = []
    for page in sorted(site.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        parser = _FetchedSources()
        parser.feed(text)
        refs = [u for u in parser.urls if re.search(r"=(https?:)?//", u)]
        refs += re.findall(r"url\(\s*['\"]?(?:https?:)?//[^)]*\)", text)
        outside += [f"{page.relative_to(site)}: {r}" for r in refs]
    assert not outside, "pages load from other hosts:\n" + "\n".join(outside)


# --- the browser -------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(site):
    """`_build/html` served on 127.0.0.1 at a free port, from a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def chromium_path() -> str:
    path = shutil.which("chromium")
    if not path:
        pytest.fail(
            "Chromium is not installed: run `make browser` (Debian's chromium and "
            "fonts-dejavu-core); the browser test never skips"
        )
    return path


def test_chromium_is_installed():
    chromium_path()


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium. Playwright gives it a fresh temporary user data dir."""
    path = chromium_path()
    from playwright.sync_api import sync_playwright

    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_FLAGS, timeout=120_000)
        yield chromium
        chromium.close()


# Waits until MathJax has typeset the page (if it is on the page) and every image has loaded
# or failed.
SETTLE_JS = """async () => {
  if (window.MathJax && window.MathJax.startup) { await window.MathJax.startup.promise; }
  await Promise.all(Array.from(document.images).map(img => {
    img.loading = "eager";
    return img.decode().catch(() => null);
  }));
}"""

# True when each widget view that myst-nb put in the page (a script tag holding its JSON) has
# got the rendered widget that the ipywidgets renderer inserts right before it.
WIDGETS_RENDERED_JS = """() => Array.from(document.querySelectorAll(
    'script[type="application/vnd.jupyter.widget-view+json"]')).every(s => {
  const area = s.previousElementSibling;
  return area && area.classList.contains("widget-subarea")
    && area.querySelector(".jupyter-widgets") !== null;
})"""

INSPECT_JS = """() => {
  const views = Array.from(document.querySelectorAll(
      'script[type="application/vnd.jupyter.widget-view+json"]'));
  const unrendered = views.filter(s => {
    const area = s.previousElementSibling;
    const w = area && area.classList.contains("widget-subarea")
      && area.querySelector(".jupyter-widgets");
    return !w || w.getBoundingClientRect().height === 0;
  }).map(s => JSON.parse(s.textContent).model_id);
  const math = Array.from(document.querySelectorAll(".math"));
  const untypeset = math.filter(m => !m.querySelector("mjx-container"))
                        .map(m => m.textContent.trim().slice(0, 60));
  const body = document.body.cloneNode(true);
  body.querySelectorAll("script, style, pre, code, textarea, template, mjx-container")
      .forEach(e => e.remove());
  const text = body.textContent;
  const rawTex = ["\\\\(", "\\\\[", "$$", "\\\\begin{"].filter(t => text.includes(t))
      .map(t => t + " in '" + text.slice(Math.max(0, text.indexOf(t) - 30),
                                         text.indexOf(t) + 40).replace(/\\s+/g, " ") + "'");
  // The widgets hand their labels to MathJax, which knows \\(..\\) but not $..$ (Sphinx's setup).
  const dollarLabels = Array.from(document.querySelectorAll(".widget-subarea .widget-label"))
      .map(l => l.textContent).filter(t => /\\$[^$]+\\$/.test(t));
  rawTex.push(...dollarLabels.map(t => "$..$ in the widget label '" + t
      + "' (write \\\\(..\\\\) for math in widget descriptions)"));
  const brokenImages = Array.from(document.images)
      .filter(img => img.naturalWidth === 0).map(img => img.src);
  const srcs = Array.from(document.scripts).filter(s => s.src).map(s => s.src.split("?")[0]);
  const twice = srcs.filter((s, i) => srcs.indexOf(s) !== i);
  return {views: views.length, unrendered, math: math.length, untypeset, rawTex,
          brokenImages, twice, mjx: document.querySelectorAll("mjx-container").length};
}"""


def open_page(browser, base: str, name: str):
    """Open one page in a fresh browser context.

    Returns what INSPECT_JS found, the problems seen on the wire or thrown by the page, and the
    console's error messages (context only).
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    problems, console = [], []
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    host = urlsplit(base).netloc

    def local(url: str) -> bool:
        return urlsplit(url).scheme in ("data", "blob", "about") or urlsplit(url).netloc == host

    context.route(lambda url: not local(url), lambda route: route.abort())  # never leave
    page = context.new_page()
    page.on("request", lambda r: None if local(r.url) else problems.append(f"request to another host: {r.url}"))
    page.on("requestfailed", lambda r: local(r.url) and problems.append(f"request failed: {r.url} ({r.failure})"))
    page.on(
        "response",
        lambda r: (
            r.status >= 400 and not r.url.endswith("/favicon.ico") and problems.append(f"HTTP {r.status}: {r.url}")
        ),
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e.message}"))
    page.on("console", lambda m: m.type == "error" and console.append(m.text))

    try:
        page.goto(f"{base}/{name}.html", wait_until="load", timeout=60_000)
        source = (HTML / f"{name}.html").read_text(encoding="utf-8")
        refresh = re.search(r'http-equiv="Refresh" content="0; url=([^"]+)"', source)
        if refresh:  # index.html only forwards to the first page: follow it, check that one
            page.wait_for_url(f"{base}/{refresh.group(1)}", timeout=30_000)
        page.wait_for_load_state("networkidle", timeout=60_000)
        page.evaluate(SETTLE_JS)
        try:
            page.wait_for_function(WIDGETS_RENDERED_JS, timeout=SETTLE_MS)
        except PlaywrightTimeout:  # INSPECT_JS names the widgets that did not render
            pass
        page.wait_for_load_state("networkidle", timeout=60_000)  # fonts the widgets asked for
        shown = page.evaluate(INSPECT_JS)
        page.screenshot(path=str(SHOTS / f"{name.replace('/', '__')}.png"), full_page=True)
    finally:
        context.close()
    return shown, problems, console


@pytest.mark.parametrize("name", PAGES)
def test_page_works_offline(site, server, browser, name):
    shown, problems, console = open_page(browser, server, name)
    if shown["unrendered"]:
        problems.append(
            f"{len(shown['unrendered'])} of {shown['views']} widgets did not render "
            f"(models {shown['unrendered']}); is _vendor/jupyter-widgets complete?"
        )
    if shown["untypeset"]:
        problems.append(f"math not typeset by MathJax: {shown['untypeset']}")
    problems += [f"raw TeX in the page text: {t}" for t in shown["rawTex"]]
    problems += [f"image did not load: {src}" for src in shown["brokenImages"]]
    problems += [f"script loaded twice: {src}" for src in shown["twice"]]
    notes = "".join(f"\n  console error: {c}" for c in console)
    assert not problems, f"{name}.html:\n  " + "\n  ".join(problems) + notes


# --- chapter 14's explorer, driven -----------------------------------------------------------


def test_cost_model_explorer_shows_the_models_numbers(site, server, browser):
    """Move the explorer's controls in Chromium; the page must show cost_model's fields for each choice.

    The built page runs no Python: its script copies the stored point of the grid (`viz.cost`).
    The expected texts are computed here, from the same cost model, for each choice.
    """
    from tputil.viz import cost as viz_cost

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.route(lambda url: urlsplit(url).netloc != urlsplit(server).netloc, lambda route: route.abort())
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(e.message))
    try:
        page.goto(f"{server}/book/14_cost_model.html", wait_until="load", timeout=60_000)
        page.wait_for_selector(".cm-explorer .cm-p select", timeout=SETTLE_MS)
        choice = dict(viz_cost.DEFAULT)

        def number(v):  # the browser writes a width of "12.0%" back as "12%"
            return float(v[:-1]) if v.endswith("%") else v

        def shown():
            return {
                k: number(v)
                for k, v in page.eval_on_selector(
                    ".cm-explorer .cm-out",
                    """out => Object.fromEntries(Array.from(out.querySelectorAll("[data-f],[data-w]")).map(
                    e => e.dataset.f ? [e.dataset.f, e.textContent] : [e.dataset.w, e.style.width]))""",
                ).items()
            }

        def expected():
            f = viz_cost.fields(choice)
            return {k: number(v) for k, v in f.items() if k != "capacity"}

        assert shown() == expected()  # the stored state, before any move
        for name, index in [("p", 1), ("model", 1), ("link", 2), ("precision", 0), ("batch", 2), ("device", 2)]:
            page.select_option(f".cm-explorer .cm-{name} select", index=index)
            choice[name] = index
            now = shown()
            assert now == expected(), f"after {name} = {viz_cost.CONTROLS[name][index][0]}"
        assert now["b0"].startswith("cannot run")  # GPT-2 XL: 25 heads, p = 2
    finally:
        context.close()
    assert not errors, errors


# --- the widgets of chapters 1-6, 9 and 10, driven ----------------------------------------------


def _shown_text(widget, want: str, wait_s: float = 5.0) -> str:
    """The text the widget shows, once it is `want` or after `wait_s` (the stack may redraw a little
    after the control moves): the caller compares, so a wrong page fails with what it shows."""
    deadline = time.monotonic() + wait_s
    while True:
        shown = widget.locator(".widget-html-content pre").text_content()
        if shown == want or time.monotonic() > deadline:
            return shown
        time.sleep(0.05)


@pytest.mark.parametrize("name", sorted(book_widgets.WIDGETS))
def test_widget_shows_what_its_controls_choose(site, server, browser, name):
    """Move each control through every position in Chromium; the page must show that choice's text.

    The slider is moved with the keyboard (Home, then ArrowRight), as a reader may; the dropdown
    by choosing an option, the toggle buttons by clicking. At each position the shown text must be
    the notebook's stored text for it, and must pass `book_widgets`' check of what that choice
    implies (derived from the value, not from the stored text).
    """
    from playwright.sync_api import expect

    check = book_widgets.WIDGETS[name]
    stored = book_widgets.stored_widget(book_widgets.notebook(name))
    printed = book_widgets.printed_pages(book_widgets.notebook(name))
    flat = stored.pages if len(stored.controls) == 1 else [t for row in stored.pages for t in row]
    assert any(t in printed for t in flat), f"{name}: no stored page equals a printed (nbval-checked) output"
    assert list(stored.start) == [c.index for c in stored.controls], "the stacks start where the controls do"

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.route(lambda url: urlsplit(url).netloc != urlsplit(server).netloc, lambda route: route.abort())
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(e.message))
    seen = []
    try:
        page.goto(f"{server}/{name}.html", wait_until="load", timeout=60_000)
        controls = ".noUi-handle, .widget-dropdown select"
        page.wait_for_selector(f".widget-subarea {controls}", timeout=SETTLE_MS)
        widget = page.locator(".widget-subarea", has=page.locator(controls))
        assert widget.count() == 1, f"{name}: {widget.count()} widgets with controls on the page"

        def look(position, choice):
            want = functools.reduce(lambda pages, i: pages[i], position, stored.pages)
            shown = _shown_text(widget, want)
            assert shown == want, f"{name} at {choice}: the page shows another choice's text:\n{shown}"
            check(choice if len(choice) > 1 else choice[0], shown)
            seen.append(shown)

        look(stored.start, tuple(c.labels[c.index] for c in stored.controls))
        if len(stored.controls) == 1:
            (slider,) = stored.controls
            handle = widget.locator(".noUi-handle")
            handle.focus()
            page.keyboard.press("Home")
            for i, label in enumerate(slider.labels):
                expect(widget.locator(".widget-readout")).to_have_text(label)  # waits for the slider to show it
                look((i,), (label,))
                page.keyboard.press("ArrowRight")
            assert len(set(seen[1:])) == len(slider.labels), "every position shows its own text"
        else:
            names, degrees = stored.controls  # chapter 6: a parameter, then p
            assert (names.kind, degrees.kind) == ("DropdownModel", "ToggleButtonsModel")
            for i, param in enumerate(names.labels):
                widget.locator(".widget-dropdown select").select_option(index=i)
                for j, p in enumerate(degrees.labels):
                    widget.locator(".widget-toggle-buttons button", has_text=re.compile(rf"^{p}$")).click()
                    look((i, j), (param, p))
            assert len(set(seen[1:])) == len(names.labels) * len(degrees.labels)
    finally:
        context.close()
    assert not errors, errors
