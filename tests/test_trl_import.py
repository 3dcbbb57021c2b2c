"""Import of TRL-format datasets as feedback events, with errors naming row and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from layerfed.clients.events import InvalidFeedback, Preference, Thumbs
from layerfed.clients.trl_import import import_preferences, import_unpaired


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_preference_rows_become_preference_events() -> None:
    """prompt/chosen/rejected rows become Preference events; extra columns are ignored."""
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "id": 17}]
    assert import_preferences(rows) == [Preference(prompt="2+2?", chosen="4", rejected="5")]


def test_unpaired_rows_become_thumbs() -> None:
    """prompt/completion/label rows become Thumbs with up = label."""
    rows = [
        {"prompt": "hi", "completion": "hello", "label": True},
        {"prompt": "hi", "completion": "go away", "label": False},
    ]
    events = import_unpaired(rows)
    assert events == [
        Thumbs(prompt="hi", response="hello", up=True),
        Thumbs(prompt="hi", response="go away", up=False),
    ]


def test_jsonl_path_is_read_line_by_line(tmp_path: Path) -> None:
    """A JSONL path (str or Path) is accepted; blank lines are skipped."""
    rows = [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        "",
        {"prompt": "d", "chosen": "e", "rejected": "f"},
    ]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    assert len(import_preferences(path)) == 2
    assert import_preferences(str(path)) == import_preferences(path)


def test_conversational_rows_are_rendered_as_role_lines() -> None:
    """TRL's conversational format (lists of messages) is rendered as 'role: content' lines."""
    row = {
        "prompt": [{"role": "user", "content": "Sky colour?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green."}],
    }
    (event,) = import_preferences([row])
    assert event.prompt == "user: Sky colour?"
    assert event.chosen == "assistant: Blue."


def test_jsonl_errors_name_the_line_and_field(tmp_path: Path) -> None:
    """An invalid row in a JSONL file names path:line (1-based, counting blanks) and the field."""
    rows = [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        "",
        {"prompt": "a", "chosen": "b", "rejected": "b"},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InvalidFeedback) as err:
        import_preferences(path)
    assert err.value.where == f"{path}:3"
    assert err.value.field == "rejected"


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": "a", "completion": "b"}, "label"),
        ({"prompt": "a", "completion": "b", "label": "yes"}, "label"),
        ({"prompt": "", "completion": "b", "label": True}, "prompt"),
        ({"prompt": "a", "completion": 3, "label": True}, "completion"),
        ({"prompt": [{"role": "user"}], "completion": "b", "label": True}, "prompt[0]"),
    ],
)
def test_unpaired_errors_name_the_row_and_field(row: dict[str, Any], field: str) -> None:
    """Invalid unpaired rows raise InvalidFeedback naming 'row N' (1-based) and the field."""
    good = {"prompt": "a", "completion": "b", "label": True}
    with pytest.raises(InvalidFeedback) as err:
        import_unpaired([good, row])
    assert err.value.where == "row 2"
    assert err.value.field == field


def test_malformed_json_line_is_a_typed_error(tmp_path: Path) -> None:
    """A line that is not a JSON object raises InvalidFeedback naming the line."""
    path = write_jsonl(tmp_path / "broken.jsonl", ['{"prompt": "a"', "[1, 2]"])
    with pytest.raises(InvalidFeedback) as err:
        import_unpaired(path)
    assert err.value.where == f"{path}:1"


def test_non_mapping_row_is_a_typed_error() -> None:
    """A row that is not a mapping raises InvalidFeedback naming the row."""
    with pytest.raises(InvalidFeedback, match=r"^row 1: "):
        import_preferences([["a", "b", "c"]])  # type: ignore[list-item]
