"""A browser checks the site: scripts/check_site.py opens pages in headless Chromium, offline.

The checker itself is tested on small hand-written pages (each fault must be reported, a clean page
must pass); then, when the book has been built (`make book`), every page of `_build/html` must pass.
All of it needs Chromium (`apt-get install chromium`, or `make check-site`): without it, skipped.
"""

from __future__ import annotations

import base64
import http.server
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"
VENDOR = ROOT / "_vendor"  # MathJax and the widget manager, from scripts/vendor_web.sh (make vendor)

spec = importlib.util.spec_from_file_location("check_site", ROOT / "scripts" / "check_site.py")
check_site = sys.modules["check_site"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(check_site)

CHROMIUM = check_site.find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium, or run `make check-site`)")

# A 1x1 PNG.
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


def write_page(site: Path, name: str, body: str, head: str = "") -> Path:
    path = site / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{name}</title>{head}</head>"
                    f"<body>{body}</body></html>")
    return path


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium, or run `make check-site`)")
    with check_site.Browser(CHROMIUM) as b:
        yield b


@pytest.fixture
def site(tmp_path):
    (tmp_path / "pixel.png").write_bytes(PIXEL)
    write_page(tmp_path, "sub/other.html", '<h2 id="section">Another page</h2>')
    return tmp_path


def check(browser, site: Path, page: Path, timeout: float = 10, **kwargs):
    """Check one page; `timeout` bounds the wait for widgets, MathJax and images (a failing page waits it out)."""
    return check_site.check_page(browser, site, page, site / "shots" / (page.stem + ".png"), timeout=timeout,
                                 **kwargs)


def joined(result) -> str:
    return "\n".join(result.problems)


# ---- the checker on hand-written pages -------------------------------------------------------------
CLEAN = """
<h1 id="top">A clean page</h1>
<p>Prices such as $5 and $10, or $5-$10, are not math. Code may hold TeX: <code>$x$ and \\alpha</code>.</p>
<pre>print("$y$ \\n")</pre>
<div class="highlight"><pre>s = r"\\frac{a}{b}"</pre></div>
<p style="display:none">$hidden$ text is not seen by a reader</p>
<img src="pixel.png" alt="one green pixel">
<p><a href="sub/other.html">a page</a>, <a href="sub/other.html#section">an anchor</a>,
<a href="#top">this page</a>, <a href="#">a button</a>, <a href="pixel.png">a file</a>,
<a href="https://example.com/">an outside link</a> (a link, not a request),
<a href="mailto:someone@example.com">mail</a>.</p>
"""


@needs_chromium
def test_a_clean_page_passes_and_gets_a_screenshot(browser, site):
    result = check(browser, site, write_page(site, "clean.html", CLEAN))
    assert result.ok, result.problems
    assert result.screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@needs_chromium
def test_a_full_page_screenshot_comes_in_tiles(browser, site):
    page = write_page(site, "tall.html", '<div style="height: 23000px">a tall page</div>')
    result = check(browser, site, page, full_page=True)
    assert result.ok, result.problems
    assert sorted(p.name for p in (site / "shots").glob("tall*.png")) == ["tall.2.png", "tall.3.png", "tall.png"]


@needs_chromium
def test_javascript_errors_are_reported(browser, site):
    page = write_page(site, "js.html", "<p>text</p><script>notDefinedAnywhere();</script>"
                                       "<script>console.error('something broke')</script>"
                                       "<script>Promise.reject(new Error('nobody caught me'))</script>")
    problems = joined(check(browser, site, page))
    assert "JS error" in problems and "notDefinedAnywhere" in problems
    assert "console error: something broke" in problems
    assert "nobody caught me" in problems


@needs_chromium
def test_raw_tex_in_the_text_is_reported(browser, site):
    page = write_page(site, "tex.html", "<p>The value $x$ is raw.</p>")
    problems = check(browser, site, page).problems
    assert any("raw TeX" in p and "$x$" in p for p in problems), problems


@needs_chromium
def test_math_broken_by_a_list_item_is_reported(browser, site):
    # Chapter 4's bug: a line of display math starting with "+ 1$" became a list item, so the
    # paragraph ends with "$\phi(x) = ..." and no closing dollar.
    page = write_page(site, "split.html", r"<p>With $\phi(x) = \operatorname{elu}(x)</p><ul><li><p>1$, the sum.</p></li></ul>")
    problems = check(browser, site, page).problems
    assert any("raw TeX" in p and r"\phi" in p for p in problems), problems


@needs_chromium
def test_math_without_mathjax_is_reported(browser, site):
    page = write_page(site, "nomath.html", r'<p>Inline <span class="math notranslate">\(x^2\)</span>.</p>',
                      head="<script>window.MathJax = {}</script>")
    problems = joined(check(browser, site, page))
    assert "math not typeset" in problems and "raw TeX" in problems


@needs_chromium
def test_a_broken_image_and_a_missing_alt_text_are_reported(browser, site):
    (site.parent / "elsewhere.png").write_bytes(PIXEL)
    page = write_page(site, "img.html", '<img src="missing.png" alt="gone"> <img src="pixel.png">'
                                        '<img src="pixel.png" alt="  "> <img src="../elsewhere.png" alt="x">')
    problems = joined(check(browser, site, page))
    assert "broken image: missing.png" in problems
    assert "image without alt text: pixel.png" in problems
    assert "loads a file outside the site" in problems and "elsewhere.png" in problems


@needs_chromium
def test_an_alt_text_that_is_the_file_name_is_a_problem_or_with_lenient_alt_a_note(browser, site):
    # What myst-nb writes for a plot whose cell has no "mystnb": {"image": {"alt": ...}}.
    page = write_page(site, "alt.html", '<img src="pixel.png" alt="pixel.png">')
    assert "image alt text is only its file name: pixel.png" in joined(check(browser, site, page))
    result = check(browser, site, page, lenient_alt=True)
    assert result.ok and "file name" in result.notes[0]


# Notebook cells as myst-nb writes them; the pre is 300 px wide, as on a narrow screen.
NARROW = "<style>pre { width: 300px; font: 14px monospace; padding: 8px; overflow: auto }</style>"
LONG_LINE = "history = lm.train(model, train_ids, val_ids, train_config, callback=LivePlot('a title'))"


def code_cell(code: str, *, collapsed: bool = False, wrap: bool = False, part: str = "cell_input") -> str:
    style = ' style="white-space: pre-wrap; overflow-wrap: anywhere"' if wrap else ""
    block = (f'<div class="{part} docutils container"><div class="highlight-ipython3 notranslate">'
             f'<div class="highlight"><pre{style}>{code}</pre></div></div></div>')
    if collapsed:  # jupyter-book's hide-input: a "Show code" toggle
        block = f'<details class="hide above-input"><summary>Show code</summary>{block}</details>'
    return f'<section id="a-section"><div class="cell docutils container">{block}</div></section>'


@needs_chromium
def test_a_line_of_code_wider_than_its_cell_is_reported_with_its_start(browser, site):
    page = write_page(site, "wide.html", code_cell(f"x = 1\n{LONG_LINE}\ny = 2"), head=NARROW)
    problems = check(browser, site, page).problems
    assert problems == [f"code wider than its cell (cut off): “{LONG_LINE[:60]}…” in section #a-section"]


@needs_chromium
def test_code_collapsed_behind_a_toggle_is_measured_too(browser, site):
    page = write_page(site, "hidden.html", code_cell(LONG_LINE, collapsed=True), head=NARROW)
    assert "code wider than its cell" in joined(check(browser, site, page))


@needs_chromium
def test_wrapped_code_short_code_and_wide_outputs_pass(browser, site):
    body = (code_cell(LONG_LINE, wrap=True) + code_cell("x = 1")
            + code_cell(LONG_LINE, part="cell_output"))  # a printed table may be wide: outputs are not checked
    result = check(browser, site, write_page(site, "fits.html", body, head=NARROW))
    assert result.ok, result.problems


@needs_chromium
def test_the_book_stylesheet_wraps_long_lines_of_code(browser, site):
    css = (ROOT / "book" / "_static" / "custom.css").read_text()
    page = write_page(site, "styled.html", code_cell(f"{LONG_LINE} {'x' * 120}"),
                      head=NARROW + f"<style>{css}</style>")
    result = check(browser, site, page)
    assert result.ok, result.problems


@needs_chromium
def test_dead_internal_links_and_anchors_are_reported(browser, site):
    page = write_page(site, "links.html", '<a href="nowhere.html">a</a> <a href="sub/other.html#no-such">b</a>'
                                          ' <a href="#not-here">c</a> <a href="../../outside.html">d</a>')
    problems = joined(check(browser, site, page))
    assert "dead link: nowhere.html" in problems
    assert "dead anchor: sub/other.html#no-such" in problems
    assert "dead anchor: #not-here" in problems
    assert "link leaves the site" in problems


@pytest.fixture
def local_server():
    """An HTTP server on this machine that counts the requests it gets."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(PIXEL)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


@needs_chromium
def test_requests_off_disk_are_blocked_and_reported(browser, site, local_server):
    url, hits = local_server
    page = write_page(site, "net.html", f"""
        <img src="http://example.com/logo.png" alt="logo">
        <img src="{url}/pixel.png" alt="served">
        <script src="https://cdn.example.com/lib.js"></script>
        <script>fetch("{url}/api").catch(() => null);</script>""")
    problems = joined(check(browser, site, page))
    assert "request to the network (blocked): http://example.com/logo.png" in problems
    assert "https://cdn.example.com/lib.js" in problems
    assert f"{url}/pixel.png" in problems and f"{url}/api" in problems
    assert hits == [], "a request reached the server: it was not blocked"


@needs_chromium
def test_a_widget_that_does_not_render_is_reported(browser, site):
    view = json.dumps({"version_major": 2, "version_minor": 0, "model_id": "0123456789abcdef"})
    page = write_page(site, "widget.html", f'<script type="application/vnd.jupyter.widget-view+json">{view}</script>')
    problems = joined(check(browser, site, page, timeout=2))
    assert "widget not rendered: model 0123456789abcdef" in problems
    assert "no saved widget state" in problems


@needs_chromium
@pytest.mark.skipif(not (VENDOR / "jupyter-widgets" / "embed.js").is_file(),
                    reason="no vendored widget manager (_vendor/, made by `make vendor`)")
def test_a_widget_with_its_saved_state_renders_and_passes(browser, site):
    ipywidgets = pytest.importorskip("ipywidgets")
    from ipywidgets.embed import embed_data

    slider = ipywidgets.IntSlider(value=3, max=10, description="n")
    data = embed_data(views=[slider])
    shutil.copy(VENDOR / "jupyter-widgets" / "embed.js", site / "embed.js")
    page = write_page(
        site, "slider.html",
        f'<script type="application/vnd.jupyter.widget-state+json">{json.dumps(data["manager_state"])}</script>'
        f'<div><script type="application/vnd.jupyter.widget-view+json">{json.dumps(data["view_specs"][0])}</script></div>',
        head='<script src="embed.js"></script>')
    result = check(browser, site, page)
    assert result.ok, result.problems


@needs_chromium
@pytest.mark.skipif(not (VENDOR / "mathjax" / "tex-mml-chtml.js").is_file(),
                    reason="no vendored MathJax (_vendor/, made by `make vendor`)")
def test_math_typeset_by_mathjax_passes(browser, site):
    shutil.copytree(VENDOR / "mathjax", site / "mathjax")
    page = write_page(
        site, "math.html", r'<p>Inline <span class="math notranslate nohighlight">\(\phi(x)^2\)</span> and</p>'
                           r'<div class="math notranslate nohighlight">\[\sum_{t=0}^{T} x_t\]</div>',
        head='<script>window.MathJax = {"options": {"processHtmlClass": "math"}}</script>'
             '<script defer src="mathjax/tex-mml-chtml.js"></script>')
    result = check(browser, site, page)
    assert result.ok, result.problems


@needs_chromium
def test_the_command_line_prints_a_line_per_page_and_fails_on_a_problem(site):
    write_page(site, "clean.html", CLEAN)
    script = [sys.executable, str(ROOT / "scripts" / "check_site.py")]
    run = subprocess.run(script + [str(site), "clean.html", "sub/other.html"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK    clean.html" in run.stdout and "2 pages checked" in run.stdout
    assert (site.parent / "site-check" / "clean.png").is_file()  # the default: next to the site

    write_page(site, "bad.html", "<p>$x$</p>")
    shots = site / "my-shots"
    run = subprocess.run(script + [str(site), "--screenshots", str(shots)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL  bad.html" in run.stdout and "raw TeX" in run.stdout
    assert {p.name for p in shots.rglob("*.png")} == {"bad.png", "clean.png", "other.png"}


@needs_chromium
def test_the_command_line_fails_on_a_file_name_alt_text_unless_lenient(site):
    write_page(site, "alt.html", '<img src="pixel.png" alt="pixel.png">')
    script = [sys.executable, str(ROOT / "scripts" / "check_site.py"), str(site), "alt.html", "--no-screenshots"]
    for flags, code in (([], 1), (["--strict-alt"], 1), (["--lenient-alt"], 0)):
        run = subprocess.run(script + flags, capture_output=True, text=True, timeout=120)
        assert run.returncode == code, (flags, run.stdout + run.stderr)
        assert "alt text is only its file name" in run.stdout


def test_the_command_line_says_when_there_is_no_site(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_site.py"), str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "make book" in run.stderr


def test_pages_are_every_html_file_but_sphinx_assets(tmp_path):
    for name in ["index.html", "book/a.html", "_static/x.html", "_sources/y.html", ".doctrees/z.html"]:
        write_page(tmp_path, name, "")
    assert [p.relative_to(tmp_path).as_posix() for p in check_site.site_pages(tmp_path)] == \
        ["book/a.html", "index.html"]


# ---- the built book ---------------------------------------------------------------------------------
@pytest.mark.skipif(not (SITE / "index.html").is_file(),
                    reason="the book is not built (_build/html/index.html missing): run `make book`")
@needs_chromium
def test_every_page_of_the_built_site_passes_in_a_browser():
    results = check_site.check_site(SITE, ROOT / "_build" / "site-check")
    assert len(results) >= 3
    failures = [check_site.format_result(r, notes=False) for r in results if not r.ok]
    if failures:
        pytest.fail(f"{len(failures)} of {len(results)} pages have problems (screenshots in _build/site-check/; "
                    "details: make check-site):\n" + "\n".join(failures), pytrace=False)
