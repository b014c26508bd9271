"""YAML input with line numbers: every user mistake becomes one ``FILE:LINE: field: problem``.

:func:`load_yaml_with_lines` parses safely and remembers the line of every key and
list item; :func:`validate` runs a pydantic model over the data and turns the first
validation error into a :class:`~edgefarm.errors.SpecError` pointing at that line.

Input is bounded before anything is built from it (:mod:`edgefarm.wire_limits`): the
text's size, the nesting depth, and the number of values after alias expansion
(counted over the node graph with memoised sizes, so a "billion laughs" document is
refused in time proportional to its own size). Whatever the bytes, the outcome is
data or one ``FILE:LINE: ...`` SpecError; messages never echo more than a short
excerpt of a value.
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
from edgefarm.wire_limits import MAX_SPEC_BYTES, MAX_SPEC_DEPTH, MAX_SPEC_NODES

PathKey = tuple[str | int, ...]
LineMap = dict[PathKey, int]

M = TypeVar("M", bound=pydantic.BaseModel)

_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# A SpecError message is cut to this many characters (a value echoed in it is cut earlier).
MAX_MESSAGE_CHARS = 500
_MAX_PATH_PART = 60  # a longer key is shown cut in a field path
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


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
    The empty path ``()`` is the document root. Syntax errors, duplicate keys,
    control characters, and input beyond the bounds (:data:`MAX_SPEC_BYTES` of text,
    :data:`MAX_SPEC_DEPTH` levels of nesting, :data:`MAX_SPEC_NODES` values after
    alias expansion, recursive aliases) raise :class:`SpecError`
    ``"FILE:LINE: invalid YAML: ..."``; nothing is constructed before the bounds hold.
    """
    if len(text) > MAX_SPEC_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        raise SpecError(_clip(f"{source}:1: the file is larger than {MAX_SPEC_BYTES} bytes"))
    bad = yaml.reader.Reader.NON_PRINTABLE.search(text)
    if bad is not None:
        raise SpecError(_clip(_bad_character(text, bad.start(), source)))
    return _load(text, source, _Loader)


def _load(text: str, source: str, loader_cls: type[Any]) -> tuple[Any, LineMap]:
    """:func:`load_yaml_with_lines` with one loader class. A syntax error found by
    libyaml is reported as PyYAML's own parser words it (the same text again with
    :class:`_PyLoader`): one wording, whichever parser is installed."""
    loader = loader_cls(text)
    try:
        node = loader.get_single_node()
        lines: LineMap = {}
        if node is None:
            return None, lines
        _check_expanded(node)
        lines[()] = node.start_mark.line + 1
        _walk(loader, node, (), lines, set(), source)
        data = loader.construct_document(node)
    except (yaml.scanner.ScannerError, yaml.parser.ParserError, yaml.reader.ReaderError) as exc:
        if loader_cls is _PyLoader:
            raise _yaml_error(exc, source) from None
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    except RecursionError:
        raise SpecError(f"{source}:1: invalid YAML: nested too deeply") from None
    else:
        return data, lines
    finally:
        loader.dispose()
    return _load(text, source, _PyLoader)


def _yaml_error(exc: yaml.YAMLError, source: str) -> SpecError:
    """One ``FILE:LINE: invalid YAML: ...`` line for a PyYAML error."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        parts = [part for part in (exc.context, exc.problem) if part]
        problem = _one_line(", ".join(parts)) or "syntax error"
        return SpecError(_clip(f"{source}:{line}: invalid YAML: {problem}"))
    return SpecError(_clip(f"{source}:1: invalid YAML: {_one_line(str(exc))}"))


class _Bounds:
    """Composer and constructor hooks of the loaders below: the composer refuses, as
    it reads, containers nested deeper than :data:`MAX_SPEC_DEPTH` and documents of
    more than :data:`MAX_SPEC_NODES` nodes (before alias expansion:
    :func:`_check_expanded` counts after); the constructor turns any failure to build
    a scalar (an int of too many digits, a date that does not exist) into a marked
    error."""

    _depth = 0
    _nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[attr-defined]
        self._nodes += 1
        if self._nodes > MAX_SPEC_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"more than {MAX_SPEC_NODES} values", event.start_mark
            )
        container = isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent)
        if container and self._depth >= MAX_SPEC_DEPTH:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"nested deeper than {MAX_SPEC_DEPTH} levels of mappings and lists",
                event.start_mark,
            )
        self._depth += container
        try:
            return super().compose_node(parent, index)  # type: ignore[misc]
        finally:
            self._depth -= container

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)  # type: ignore[misc]
        except (ValueError, OverflowError, TypeError, ArithmeticError) as exc:
            reason = "too many digits" if "digits" in str(exc) else str(exc)
            problem = f"cannot read {_excerpt(getattr(node, 'value', ''))}: {reason}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


class _PyLoader(_Bounds, yaml.SafeLoader):
    """The pure-Python reader, scanner and parser, with the bounded composer."""


try:
    from yaml._yaml import CParser as _CParser

    _LIBYAML = True
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _LIBYAML = False

if _LIBYAML:

    class _CLoader(
        _Bounds,
        yaml.composer.Composer,
        _CParser,  # libyaml's events (some 30 times faster); Python composes
        yaml.constructor.SafeConstructor,
        yaml.resolver.Resolver,
    ):
        """libyaml's scanner and parser, with the Python (bounded) composer: the
        Composer comes first, so libyaml's own composer is never used."""

        def __init__(self, stream: str) -> None:
            _CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    _Loader: type[Any] = _CLoader
else:  # pragma: no cover - PyYAML built without libyaml
    _Loader = _PyLoader


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expanded(root: yaml.Node) -> None:
    """Refuse a node graph whose expansion (every alias replaced by a copy of its
    anchor) holds more than :data:`MAX_SPEC_NODES` values, nests deeper than
    :data:`MAX_SPEC_DEPTH`, or never ends (an alias inside its own anchor).

    Sizes and depths are memoised per node, so the cost is linear in the graph,
    however large the expansion would be; the walk is iterative (no recursion).
    """
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded values, depth)
    active = {id(root)}
    stack = [(root, iter(_children(root)))]
    while stack:
        node, pending = stack[-1]
        child = next(pending, None)
        if child is None:
            stack.pop()
            active.discard(id(node))
            kids = [sizes[id(kid)] for kid in _children(node)]
            size = min(1 + sum(k[0] for k in kids), MAX_SPEC_NODES + 1)
            container = not isinstance(node, yaml.ScalarNode)
            depth = container + max((k[1] for k in kids), default=0)
            sizes[id(node)] = (size, depth)
            if size > MAX_SPEC_NODES:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"more than {MAX_SPEC_NODES} values after alias expansion",
                    node.start_mark,
                )
            if depth > MAX_SPEC_DEPTH:
                raise _too_deep(node)
            continue
        key = id(child)
        if key in sizes:
            continue
        if key in active:
            raise yaml.composer.ComposerError(
                None,
                None,
                "the node anchored here contains an alias of itself (recursive "
                "structures are not allowed)",
                child.start_mark,
            )
        if len(stack) > MAX_SPEC_DEPTH:
            raise _too_deep(child)
        active.add(key)
        stack.append((child, iter(_children(child))))


def _too_deep(node: yaml.Node) -> yaml.MarkedYAMLError:
    return yaml.composer.ComposerError(
        None,
        None,
        f"nested deeper than {MAX_SPEC_DEPTH} levels of mappings and lists after alias expansion",
        node.start_mark,
    )


def _bad_character(text: str, position: int, source: str) -> str:
    """One line for a character YAML does not accept (control characters, NUL)."""
    line = text.count("\n", 0, position) + 1
    code = ord(text[position])
    if code == 0:
        what = "a NUL byte"
    elif 0xD800 <= code <= 0xDFFF:
        what = f"unpaired surrogate U+{code:04X}"
    else:
        what = f"control character U+{code:04X}"
    return f"{source}:{line}: invalid YAML: {what} is not allowed (write it as an escape)"


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
                    _clip(
                        f"{source}:{line}: invalid YAML: duplicate key {_excerpt(key)} "
                        f"(first given at line {first_seen[key]})"
                    )
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
        raise SpecError(_clip(f"{source}:{line}: {prefix}{exc.message}")) from None
    except pydantic.ValidationError as exc:
        error = _first_error(exc.errors(include_url=False))
        raise SpecError(_clip(describe_error(model_cls, error, lines, source))) from None
    except RecursionError:
        raise SpecError(f"{source}:1: nested too deeply") from None


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
        with path.open("rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a YAML file") from None
    except OSError as exc:
        raise SpecError(_clip(f"{path}: cannot read: {exc.strerror or exc}")) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}:1: the file is larger than {MAX_SPEC_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SpecError(
            f"{path}:{line}: not a UTF-8 text file (byte 0x{raw[exc.start]:02x} "
            f"at offset {exc.start})"
        ) from None
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
        elif len(part) > _MAX_PATH_PART:
            out += f"[{_excerpt(part, _MAX_PATH_PART)}]"
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
        if len(name) > _MAX_PATH_PART:
            name = name[: _MAX_PATH_PART - 3] + "..."
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
    return _excerpt(value)


def _excerpt(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters; a long str or a big int is cut
    before it is formatted (never builds a huge text)."""
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 192:
        return f"an integer of {value.bit_length()} bits"
    elif isinstance(value, dict | list | tuple | set):
        return f"a {type(value).__name__} of {len(value)} entries"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def excerpt(value: Any, limit: int = 60) -> str:
    """A short, one-line ``repr`` of ``value`` for an error message (see
    :func:`_excerpt`)."""
    return _excerpt(value, limit)


def _clip(message: str) -> str:
    """A message as one line of at most :data:`MAX_MESSAGE_CHARS` characters."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # surrogates
    return _CONTROL.sub(" ", message)


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
