"""What a reader of the built book gets from each chapter's stored notebook, checked from the JSON alone
(nothing is executed, so this runs in a second):

- every plot is a figure: a caption, a name to link to (unique in the book) and an alt text that says
  what the plot shows, for a screen reader (myst-nb reads them from the cell's metadata, see below);
- every widget control saved in a notebook has a label (its `description`), so that a screen reader
  can say what the slider or box is for;
- no line of code is so long that the page has to cut it: 88 characters is the style, 120 the limit
  (custom.css wraps what does not fit, and scripts/check_site.py fails a page whose code still
  overflows).

A plot's cell carries, merged with its other metadata (tags such as nbval-ignore-output stay):

    "mystnb": {"figure": {"caption": "One sentence.", "name": "fig-04-kv-cache"},
               "image": {"alt": "What is on the axes and what the reader should see."}}

myst-nb 1.x wraps *every* display output of such a cell in the figure: a cell whose plot shares the
cell with another rich output (a progress-bar widget, a second image) would get the caption twice and
its name twice, a duplicate target that fails the strict build. Such a cell takes the alt text only,
and its plot is introduced by the text around it; the way to a caption is to give the plot a cell of
its own (a re-execution).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "book").glob("*.ipynb"))

MAX_LINE = 120  # the hard limit; 88 is the style (the CSS wraps what is between)
MIN_ALT = 30  # characters: "Line chart of the loss" is not yet a description
NAME = re.compile(r"fig-[a-z0-9]+(-[a-z0-9]+)*")  # a docutils name that needs no normalising
FILE_NAME = re.compile(r"[\w.-]+\.(png|jpe?g|gif|svg|webp)", re.IGNORECASE)
FIGURE_KEYS = {"caption", "name", "classes", "align", "caption_before"}  # what myst-nb reads
IMAGE_KEYS = {"alt", "classes", "height", "width", "scale", "align"}
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
# Widget models that show something but take no input: no label needed. Everything else of
# @jupyter-widgets/controls (sliders, dropdowns, text boxes, buttons, checkboxes, ...) is a control.
DISPLAY_ONLY = {"HTMLModel", "HTMLMathModel", "LabelModel", "FloatProgressModel", "IntProgressModel",
                "ImageModel", "AudioModel", "VideoModel", "ValidModel", "BoxModel", "HBoxModel",
                "VBoxModel", "GridBoxModel", "AccordionModel", "TabModel", "StackModel",
                "LinkModel", "DirectionalLinkModel"}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def plots(nb: dict) -> list[dict]:
    return [c for c in code_cells(nb) if any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]


def display_outputs(cell: dict) -> list[dict]:
    return [o for o in cell.get("outputs", []) if o["output_type"] in ("display_data", "execute_result")]


def where(path: Path, cell: dict) -> str:
    first = next((line for line in source(cell).splitlines() if line.strip()), "")
    return f"{path.name}, cell {cell.get('id')} ({first[:60]!r})"


def ids(paths):
    return [p.stem for p in paths]


def test_there_are_chapters_and_plots():
    assert len(CHAPTERS) >= 10
    assert sum(len(plots(load(p))) for p in CHAPTERS) >= 20


# ---- figures ---------------------------------------------------------------------------------------
def figure_problems(path: Path, cell: dict) -> list[str]:
    """What is wrong with the figure metadata of one cell with a plot (empty: nothing)."""
    meta = cell["metadata"].get("mystnb", {})
    figure, image = meta.get("figure"), meta.get("image")
    problems = []
    if not isinstance(image, dict) or not isinstance(image.get("alt"), str):
        problems.append('no alt text: add "mystnb": {"image": {"alt": "..."}}')
    else:
        alt = image["alt"].strip()
        if FILE_NAME.fullmatch(alt):
            problems.append(f"the alt text is a file name: {alt!r}")
        elif len(alt) < MIN_ALT:
            problems.append(f"the alt text is too short to describe the plot ({len(alt)} characters): {alt!r}")
        if set(image) - IMAGE_KEYS:
            problems.append(f"image options myst-nb does not know: {sorted(set(image) - IMAGE_KEYS)}")
    if len(display_outputs(cell)) > 1:
        if figure is not None:
            problems.append(f"{len(display_outputs(cell))} display outputs: myst-nb would wrap each in the "
                            "figure (the caption twice, a duplicate name); drop the figure, keep the alt text")
        return problems
    if not isinstance(figure, dict):
        return problems + ['no caption: add "mystnb": {"figure": {"caption": "...", "name": "fig-..."}}']
    caption, name = figure.get("caption"), figure.get("name")
    if not isinstance(caption, str) or not caption.strip():
        problems.append("no figure caption")
    elif "\n\n" in caption or caption.lstrip()[:1] in ("#", "-", "*", ">", "|", "+"):
        problems.append(f"the caption must be one paragraph of text: {caption!r}")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        problems.append(f"the figure name must look like fig-04-kv-cache: {name!r}")
    if set(figure) - FIGURE_KEYS:
        problems.append(f"figure options myst-nb does not know: {sorted(set(figure) - FIGURE_KEYS)}")
    if isinstance(caption, str) and isinstance(image, dict) and image.get("alt", "").strip() == caption.strip():
        problems.append("the alt text repeats the caption: say what the plot shows")
    return problems


@pytest.mark.parametrize("path", CHAPTERS, ids=ids(CHAPTERS))
def test_every_plot_has_a_caption_a_name_and_an_alt_text(path):
    nb = load(path)
    problems = [f"{where(path, cell)}: {p}" for cell in plots(nb) for p in figure_problems(path, cell)]
    assert not problems, "\n".join(problems)


def test_figure_names_are_unique_in_the_book():
    names = Counter()
    for path in CHAPTERS:
        for cell in code_cells(load(path)):
            name = cell["metadata"].get("mystnb", {}).get("figure", {}).get("name")
            if name:
                names[name] += 1
    assert not [n for n, k in names.items() if k > 1], f"used more than once: {[n for n, k in names.items() if k > 1]}"


def test_the_checks_catch_what_they_should(tmp_path):
    path = tmp_path / "99_example.ipynb"
    png = {"output_type": "display_data", "data": {"image/png": "iVBOR", "text/plain": ["<Figure>"]}, "metadata": {}}
    widget = {"output_type": "display_data", "metadata": {},
              "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "x"}, "text/plain": ["bar"]}}
    good = {"figure": {"caption": "The loss falls.", "name": "fig-99-loss"},
            "image": {"alt": "Line chart of the loss against the step, falling from 4 to 2."}}

    def cell(mystnb=None, outputs=(png,)):
        return {"cell_type": "code", "id": "c", "source": "plt.show()", "outputs": list(outputs),
                "metadata": {"mystnb": mystnb} if mystnb is not None else {}}

    assert figure_problems(path, cell(good)) == []
    assert any("no alt text" in p for p in figure_problems(path, cell({"figure": good["figure"]})))
    assert any("no caption" in p for p in figure_problems(path, cell({"image": good["image"]})))
    assert any("file name" in p for p in figure_problems(path, cell({**good, "image": {"alt": "0a1b2c.png"}})))
    assert any("too short" in p for p in figure_problems(path, cell({**good, "image": {"alt": "A plot"}})))
    assert any("fig-04" in p for p in figure_problems(path, cell({**good, "figure": {"caption": "x", "name": "F 1"}})))
    assert any("one paragraph" in p
               for p in figure_problems(path, cell({**good, "figure": {"caption": "a\n\nb", "name": "fig-a"}})))
    # a plot next to a widget: the alt text only, the figure would be duplicated
    assert figure_problems(path, cell({"image": good["image"]}, outputs=(png, widget))) == []
    assert any("duplicate" in p for p in figure_problems(path, cell(good, outputs=(png, widget))))


# ---- widgets ---------------------------------------------------------------------------------------
def unlabelled_controls(nb: dict) -> list[str]:
    state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    missing = []
    for model_id, model in state.items():
        name = model.get("model_name", "")
        if (model.get("model_module") != "@jupyter-widgets/controls" or name in DISPLAY_ONLY
                or name.endswith(("StyleModel", "LayoutModel"))):
            continue
        description = model.get("state", {}).get("description")
        if not (isinstance(description, str) and description.strip()):
            value = model.get("state", {}).get("value")
            missing.append(f"{name} {model_id} (value {value!r})")
    return missing


@pytest.mark.parametrize("path", CHAPTERS, ids=ids(CHAPTERS))
def test_every_saved_widget_control_has_a_label(path):
    missing = unlabelled_controls(load(path))
    assert not missing, (f"{path.name}: controls without a description (pass description=... where the "
                         f"widget is made, and re-run the chapter): " + "; ".join(missing))


def test_the_widget_check_knows_a_control_from_a_display():
    def nb(*models):
        return {"metadata": {"widgets": {WIDGET_STATE: {"state": {
            str(i): {"model_module": "@jupyter-widgets/controls", "model_name": name, "state": state}
            for i, (name, state) in enumerate(models)}}}}}

    assert unlabelled_controls(nb(("IntSliderModel", {"description": "seed", "value": 0}),
                                  ("FloatProgressModel", {"description": ""}),
                                  ("HTMLModel", {"description": ""}),
                                  ("SliderStyleModel", {"description_width": ""}))) == []
    assert len(unlabelled_controls(nb(("FloatSliderModel", {"description": "", "value": 1.0}),
                                      ("TextModel", {"value": "x"})))) == 2


# ---- code lines ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CHAPTERS, ids=ids(CHAPTERS))
def test_no_line_of_code_is_longer_than_the_limit(path):
    long = [f"cell {cell.get('id')}, {len(line)} characters: {line.strip()[:70]}"
            for cell in code_cells(load(path)) for line in source(cell).splitlines() if len(line) > MAX_LINE]
    assert not long, f"{path.name}: lines over {MAX_LINE} characters (88 is the style):\n" + "\n".join(long)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_each_chapter_makes_waiting_threads_sleep_before_torch_loads(path):
    # OpenMP reads GOMP_SPINCOUNT once, when torch loads it: set later, it does nothing. Without it a
    # busy CPU made 2 threads 5-25x slower (scripts/threads_under_load.py); see the Makefile.
    notebook = json.loads(path.read_text(encoding="utf-8"))
    first = next(cell for cell in notebook["cells"] if cell["cell_type"] == "code")
    lines = "".join(first["source"]).splitlines()
    setting = [i for i, line in enumerate(lines) if line == 'os.environ.setdefault("GOMP_SPINCOUNT", "5000")']
    loads_torch = [i for i, line in enumerate(lines) if re.match(r"(import|from) (torch|lm|transformers)\b", line)]
    assert setting and loads_torch and setting[0] < loads_torch[0], path.name
    assert "export GOMP_SPINCOUNT ?= 5000" in (ROOT / "Makefile").read_text()
