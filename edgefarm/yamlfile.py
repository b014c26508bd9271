"""YAML input with line numbers: every user mistake becomes one ``FILE:LINE: field: problem``.

:func:`load_yaml_with_lines` parses safely and remembers the line of every key and
list item; :func:`validate` runs a pydantic model over the data and turns the first
validation error into a :class:`~edgefarm.errors.SpecError` pointing at that line.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from edgefarm.errors import SpecError

PathKey = tuple[str | int, ...]
LineMap = dict[PathKey, int]

M = TypeVar("M", bound=pydantic.BaseModel)

_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class FieldError(SpecError):
    """Raised by a model validator that knows the absolute path of the bad value.

    pydantic lets exceptions other than ``ValueError`` through untouched, so
    :func:`validate` receives this one and reports ``loc`` (a path from the document
    root, e.g. ``("backends", 0, "schemes", 1)``) with its line. Being a SpecError,
    it still reads cleanly when a model is validated outside :func:`validate`.
    """

    def __init__(self, loc: PathKey, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def load_yaml_with_lines(text: str, source: str) -> tuple[Any, LineMap]:
    """Parse YAML safely into plain data and a map from each path to its 1-based line.

    A path is the tuple of mapping keys and list indices leading to a value; the
    line of a mapping entry is the line of its key, of a list item its first line.
    The empty path ``()`` is the document root. Syntax errors and duplicate keys
    raise :class:`SpecError` ``"FILE:LINE: invalid YAML: ..."``.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: LineMap = {}
        if node is None:
            return None, lines
        lines[()] = node.start_mark.line + 1
        _walk(loader, node, (), lines, set(), source)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        parts = [part for part in (exc.context, exc.problem) if part]
        problem = _one_line(", ".join(parts)) or "syntax error"
        raise SpecError(f"{source}:{line}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}:1: invalid YAML: {_one_line(str(exc))}") from None
    finally:
        loader.dispose()
    return data, lines


def _walk(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: PathKey,
    lines: LineMap,
    seen: set[int],
    source: str,
) -> None:
    """Record the line of every path below ``node`` (aliased nodes are walked once)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _walk(loader, item, (*path, index), lines, seen, source)
    elif isinstance(node, yaml.MappingNode):
        first_seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str | int) or isinstance(key, bool):
                continue
            if key in first_seen:
                raise SpecError(
                    f"{source}:{line}: invalid YAML: duplicate key {key!r} "
                    f"(first given at line {first_seen[key]})"
                )
            first_seen[key] = line
            lines[(*path, key)] = line
            _walk(loader, value_node, (*path, key), lines, seen, source)


def validate(
    model_cls: type[M],
    text: str,
    source: str,
    *,
    context: dict[str, Any] | None = None,
) -> M:
    """Parse ``text`` and validate it as ``model_cls``; errors become one-line SpecErrors.

    An empty document validates as an empty mapping. ``context`` is passed to
    pydantic validators (``info.context``).
    """
    data, lines = load_yaml_with_lines(text, source)
    if data is None:
        data = {}
    try:
        return model_cls.model_validate(data, context=context)
    except FieldError as exc:
        line, shown = locate(exc.loc, lines)
        prefix = f"{format_path(shown)}: " if shown else ""
        raise SpecError(f"{source}:{line}: {prefix}{exc.message}") from None
    except pydantic.ValidationError as exc:
        error = _first_error(exc.errors())
        raise SpecError(describe_error(model_cls, error, lines, source)) from None


def _first_error(errors: list[Any]) -> Any:
    """The first error, except that a missing field next to an unknown one (a typo:
    ``nmae`` for ``name``) is reported as the unknown field, which explains both."""
    first = errors[0]
    if first.get("type") == "missing":
        parent = tuple(first.get("loc", ()))[:-1]
        for error in errors:
            loc = tuple(error.get("loc", ()))
            if error.get("type") == "extra_forbidden" and loc[:-1] == parent:
                return error
    return first


def load_file(
    model_cls: type[M],
    path: Path,
    *,
    context: dict[str, Any] | None = None,
) -> M:
    """Read ``path`` and :func:`validate` it; an unreadable file is a SpecError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a YAML file") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return validate(model_cls, text, str(path), context=context)


def locate(loc: tuple[Any, ...], lines: LineMap) -> tuple[int, PathKey]:
    """The line for an error location and the path to show for it.

    The line is that of the deepest prefix of ``loc`` found in ``lines`` (parts that
    are not in the document, such as pydantic's union tags, are skipped), else line 1.
    The shown path keeps the found parts plus trailing names (e.g. a missing field).
    """
    found: PathKey = ()
    shown: list[str | int] = []
    for part in loc:
        candidate = (*found, part)
        if isinstance(part, str | int) and candidate in lines:
            found = candidate
            shown.append(part)
        elif isinstance(part, int) or (isinstance(part, str) and _PLAIN_KEY.match(part)):
            shown.append(part)
    line = lines.get(found, 1)
    return line, tuple(shown)


def format_path(path: PathKey) -> str:
    """``("backends", 0, "schemes", 1)`` -> ``backends[0].schemes[1]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def describe_error(
    model_cls: type[pydantic.BaseModel],
    error: Any,
    lines: LineMap,
    source: str,
) -> str:
    """One line ``FILE:LINE: path: problem`` for one pydantic error entry."""
    loc: tuple[Any, ...] = tuple(error.get("loc", ()))
    line, shown = locate(loc, lines)
    kind = error.get("type", "")
    message = _problem(model_cls, kind, error, loc)
    prefix = f"{format_path(shown)}: " if shown else ""
    return f"{source}:{line}: {prefix}{message}"


def _problem(
    model_cls: type[pydantic.BaseModel], kind: str, error: Any, loc: tuple[Any, ...]
) -> str:
    """Human wording of a pydantic error."""
    msg = _one_line(str(error.get("msg", "invalid value")))
    if kind == "missing":
        return "missing required field"
    if kind == "extra_forbidden":
        name = str(loc[-1]) if loc else "?"
        allowed = _allowed_fields(model_cls, loc[:-1])
        hint = ""
        if allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = (
                f" (did you mean '{close[0]}'?)"
                if close
                else f" (expected one of: {', '.join(allowed)})"
            )
        return f"unknown field '{name}'{hint}"
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    value = error.get("input")
    if kind in ("model_type", "dict_type"):
        return f"expected a mapping (got {_describe_input(value)})"
    if kind == "list_type":
        return f"expected a list (got {_describe_input(value)})"
    msg = msg[:1].lower() + msg[1:]
    if isinstance(value, dict | list | tuple):
        return msg
    return f"{msg} (got {_describe_input(value)})"


def _describe_input(value: Any) -> str:
    """Short description of an offending input value."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if value is None:
        return "nothing"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _allowed_fields(model_cls: type[pydantic.BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model found at ``loc`` below ``model_cls`` (best effort)."""
    current: Any = model_cls
    for part in loc:
        current = _step(current, part)
        if current is None:
            return []
    model = _as_model(current)
    if model is None:
        return []
    return [field.alias or name for name, field in model.model_fields.items()]


def _options(annotation: Any) -> list[Any]:
    """The alternatives of a union / Optional / Annotated annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _options(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [opt for arg in typing.get_args(annotation) for opt in _options(arg)]
    return [annotation]


def _as_model(annotation: Any) -> type[pydantic.BaseModel] | None:
    for option in _options(annotation):
        if isinstance(option, type) and issubclass(option, pydantic.BaseModel):
            return option
    return None


def _step(annotation: Any, part: Any) -> Any:
    """The annotation reached from ``annotation`` by one path part, or None."""
    if isinstance(part, str):
        model = _as_model(annotation)
        if model is not None:
            for name, field in model.model_fields.items():
                if part in (name, field.alias):
                    return field.annotation
    for option in _options(annotation):
        origin = typing.get_origin(option)
        args = typing.get_args(option)
        if isinstance(part, int) and origin in (list, tuple, set, frozenset) and args:
            return args[0]
        if origin is dict and len(args) == 2:
            return args[1]
    return None
