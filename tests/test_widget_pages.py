"""The texts stored in the widgets of chapters 1-6, 9 and 10 say what their controls choose.

A quick check without a browser (tests/test_book.py moves the controls in Chromium): for every
choice of every widget, the stored text passes `book_widgets`' check for that choice, and the text
of any other choice fails it, so the checks tell the choices apart.
"""

import book_widgets
import pytest


def choices(name):
    """(choice, stored text) for every position of the widget's controls."""
    stored = book_widgets.stored_widget(book_widgets.notebook(name))
    if len(stored.controls) == 1:
        return list(zip(stored.controls[0].labels, stored.pages))
    first, second = stored.controls
    return [((a, b), text) for a, row in zip(first.labels, stored.pages) for b, text in zip(second.labels, row)]


@pytest.mark.parametrize("name", sorted(book_widgets.WIDGETS))
def test_every_stored_text_is_the_one_its_choice_implies(name):
    check = book_widgets.WIDGETS[name]
    pairs = choices(name)
    assert len(pairs) >= 3
    for choice, text in pairs:
        check(choice, text)
    for choice, _ in pairs:
        for other, text in pairs:
            if other != choice:
                with pytest.raises(AssertionError):
                    check(choice, text)


def test_the_ring_oracle_ends_with_every_device_holding_the_sum():
    states = book_widgets.ring_states()
    assert len(states) == 7
    assert states[-1] == [[1111, 2222, 3333, 4444]] * 4
    assert [states[3][r][r] for r in range(4)] == [1111, 2222, 3333, 4444]  # reduce-scatter's result


def test_every_chapter_with_controls_is_driven():
    """A new widget with controls must get a check here (chapter 14's explorer has its own test)."""
    import json

    with_controls = set()
    for path in sorted((book_widgets.ROOT / "book").glob("*.ipynb")):
        state = json.loads(path.read_text(encoding="utf-8"))["metadata"].get("widgets", {})
        models = state.get(book_widgets.STATE, {}).get("state", {}).values()
        if any(m["model_name"] in book_widgets.CONTROLS for m in models):
            with_controls.add(f"book/{path.stem}")
    assert with_controls - {"book/14_cost_model"} == set(book_widgets.WIDGETS)
