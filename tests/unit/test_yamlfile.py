"""YAML loading with line numbers and one-line validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, model_validator

from edgefarm.errors import SpecError
from edgefarm.yamlfile import FieldError, format_path, load_file, load_yaml_with_lines, validate

DOC = """\
# a comment
top: 1
items:
  - first
  - name: second
    size: 2
nested:
  inner:
    deep: true
"""


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    size: int = 0


class Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top: int
    items: list[Item] = []
    color: str = "red"

    @model_validator(mode="after")
    def _no_big(self) -> Doc:
        for index, item in enumerate(self.items):
            if item.size > 10:
                raise FieldError(("items", index, "size"), f"size {item.size} is too big")
        return self


def test_lines_of_keys_and_list_items() -> None:
    data, lines = load_yaml_with_lines(DOC, "d.yaml")
    assert data == {
        "top": 1,
        "items": ["first", {"name": "second", "size": 2}],
        "nested": {"inner": {"deep": True}},
    }
    assert lines[()] == 2
    assert lines[("top",)] == 2
    assert lines[("items",)] == 3
    assert lines[("items", 0)] == 4
    assert lines[("items", 1)] == 5
    assert lines[("items", 1, "name")] == 5
    assert lines[("items", 1, "size")] == 6
    assert lines[("nested", "inner", "deep")] == 9


def test_empty_document() -> None:
    assert load_yaml_with_lines("# nothing\n", "e.yaml") == (None, {})


def test_anchors_and_merge_keys_construct() -> None:
    text = "base: &b {k: 1}\nother:\n  <<: *b\n  q: 2\n"
    data, lines = load_yaml_with_lines(text, "a.yaml")
    assert data == {"base": {"k": 1}, "other": {"k": 1, "q": 2}}
    assert lines[("other", "q")] == 4


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("a: 1\nb: [1, 2\n", 3, "expected ',' or ']'"),
        ("a: 1\n  b: 2\nc: 3\n", 2, "mapping values are not allowed"),
        ("a: 1\nb:\n\tc: 1\n", 3, "'\\t'"),
        ("a: !!python/object:os.system x\n", 1, "could not determine a constructor"),
    ],
)
def test_invalid_yaml_is_one_line_with_line_number(text: str, line: int, words: str) -> None:
    with pytest.raises(SpecError) as info:
        load_yaml_with_lines(text, "bad.yaml")
    message = str(info.value)
    assert message.startswith(f"bad.yaml:{line}: invalid YAML: ")
    assert words in message
    assert "\n" not in message


def test_duplicate_key_is_an_error() -> None:
    with pytest.raises(
        SpecError, match=r"^d\.yaml:3: invalid YAML: duplicate key 'a' \(first given at line 1\)$"
    ):
        load_yaml_with_lines("a: 1\nb: 2\na: 3\n", "d.yaml")


def _error(text: str) -> str:
    with pytest.raises(SpecError) as info:
        validate(Doc, text, "doc.yaml")
    return str(info.value)


def test_validate_returns_the_model() -> None:
    doc = validate(Doc, "top: 3\nitems:\n  - name: a\n", "doc.yaml")
    assert doc.top == 3
    assert doc.items == [Item(name="a")]


def test_wrong_type_points_at_the_value() -> None:
    text = "top: 1\nitems:\n  - name: a\n  - name: b\n    size: big\n"
    assert _error(text) == (
        "doc.yaml:5: items[1].size: input should be a valid integer, "
        "unable to parse string as an integer (got 'big')"
    )


def test_missing_field_uses_the_parent_line() -> None:
    assert _error("top: 1\nitems:\n  - size: 1\n") == (
        "doc.yaml:3: items[0].name: missing required field"
    )
    assert _error("# header\n\ncolor: blue\n") == "doc.yaml:3: top: missing required field"


def test_unknown_field_suggests_the_close_name() -> None:
    assert _error("top: 1\ncolour: blue\n") == (
        "doc.yaml:2: colour: unknown field 'colour' (did you mean 'color'?)"
    )
    assert _error("top: 1\nitems:\n  - name: a\n    zzz: 1\n") == (
        "doc.yaml:4: items[0].zzz: unknown field 'zzz' (expected one of: name, size)"
    )


def test_field_error_from_a_validator_gets_its_line() -> None:
    text = "top: 1\nitems:\n  - name: a\n  - name: b\n    size: 11\n"
    assert _error(text) == "doc.yaml:5: items[1].size: size 11 is too big"


def test_non_mapping_document() -> None:
    assert _error("- 1\n- 2\n") == "doc.yaml:1: expected a mapping (got a list)"
    assert _error("") == "doc.yaml:1: top: missing required field"


def test_load_file_reads_and_names_missing_file(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("top: 7\n")
    assert load_file(Doc, good).top == 7
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match=r"nope\.yaml: file not found$"):
        load_file(Doc, missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("top: x\n")
    with pytest.raises(SpecError, match=rf"^{bad}:1: top: "):
        load_file(Doc, bad)


def test_format_path() -> None:
    assert format_path(("backends", 0, "schemes", 1)) == "backends[0].schemes[1]"
    assert format_path(("options", "a b")) == "options['a b']"
    assert format_path(()) == ""


def test_shared_anchors_within_the_bounds_load() -> None:
    levels = ["l0: &l0 [a, b, c, d, e, f, g, h, i, j]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 4)]
    data, lines = load_yaml_with_lines("\n".join(levels) + "\n", "a.yaml")
    assert len(data["l3"]) == 10 and data["l3"][9][9][9][9] == "j"  # 11,111 values expanded
    assert lines[("l3",)] == 4


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a: &a [*a]\n", "a.yaml:1: invalid YAML: the node anchored here contains an alias"),
        ("a: " + "[" * 33 + "]" * 33 + "\n", "a.yaml:1: invalid YAML: nested deeper than 32"),
        ("a: [" + ", ".join(["x"] * 100_001) + "]\n", "a.yaml:1: invalid YAML: more than 100000"),
        ("a: b\x00\n", "a.yaml:1: invalid YAML: a NUL byte is not allowed"),
        ("a: 1\nb: \x1b[31m\n", "a.yaml:2: invalid YAML: control character U+001B"),
        ("a: 1" + "0" * 5000 + "\n", "a.yaml:1: invalid YAML: cannot read '1000"),
        ("a: " + "x" * (1 << 20) + "\n", "a.yaml:1: the file is larger than 1048576 bytes"),
    ],
)
def test_hostile_yaml_is_one_short_line(text: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        load_yaml_with_lines(text, "a.yaml")
    message = str(info.value)
    assert message.startswith(fragment) and "\n" not in message and len(message) <= 500


def test_a_32_deep_document_loads() -> None:
    data, _ = load_yaml_with_lines("a: " + "[" * 31 + "]" * 31 + "\n", "a.yaml")
    assert isinstance(data["a"], list)


def test_error_messages_never_echo_a_huge_value(tmp_path: Path) -> None:
    path = tmp_path / "doc.yaml"
    path.write_text(f"top: '{'t' * 500_000}'\n")
    with pytest.raises(SpecError) as info:
        load_file(Doc, path)
    message = str(info.value)
    assert message.startswith(f"{path}:1: top:")
    assert len(message) - len(str(path)) < 200  # the echoed value is cut short


def test_invalid_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "doc.yaml"
    path.write_bytes(b"top: 1\nitems:\n  - caf\xe9\n")
    with pytest.raises(SpecError, match=r"doc\.yaml:3: not a UTF-8 text file \(byte 0xe9"):
        load_file(Doc, path)
