"""The .proto comments quote every wire limit as ``NAME (value)``; the values must be
those of :mod:`edgefarm.wire_limits`, and ``edgefarm.PROTOCOL_VERSION`` the quoted one."""

from __future__ import annotations

import re
from pathlib import Path

import edgefarm
from edgefarm import wire_limits

PROTO_DIR = Path(__file__).resolve().parents[2] / "protos" / "edgefarm" / "v1"
NAME = re.compile(r"\bMAX_[A-Z0-9_]+\b")
QUOTE = re.compile(r"\b(MAX_[A-Z0-9_]+) \((\d+)\)")
# Limits an agent must know: each is quoted somewhere in the contract.
AGENT_FACING = (
    "MAX_MESSAGE_BYTES",
    "MAX_TRIALS",
    "MAX_SAMPLES_PER_TRIAL",
    "MAX_SAMPLES_PER_RESULT",
    "MAX_STRING_BYTES",
    "MAX_MAP_ENTRIES",
    "MAX_LIST_ENTRIES",
    "MAX_EXAMPLE_OUTCOMES",
    "MAX_NAME_BYTES",
)


def _comments() -> list[tuple[str, int, str]]:
    """(file, line number, comment text) of every ``//`` comment in the protos."""
    out = []
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        for number, line in enumerate(proto.read_text().splitlines(), 1):
            _, sep, comment = line.partition("//")
            if sep:
                out.append((proto.name, number, comment))
    return out


def test_every_quoted_limit_equals_wire_limits() -> None:
    quoted = 0
    for name, number, comment in _comments():
        where = f"{name}:{number}"
        for mention in NAME.finditer(comment):
            quote = QUOTE.match(comment, mention.start())
            assert quote is not None, f"{where}: write {mention.group()} as 'NAME (value)'"
            constant, value = quote.groups()
            assert hasattr(wire_limits, constant), f"{where}: {constant} is not in wire_limits"
            expected = getattr(wire_limits, constant)
            assert int(value) == expected, f"{where}: {constant} ({value}) != {expected}"
            quoted += 1
    assert quoted > 0


def test_every_agent_facing_limit_is_quoted() -> None:
    text = " ".join(comment for _, _, comment in _comments())
    missing = [name for name in AGENT_FACING if f"{name} (" not in text]
    assert not missing, f"limits the .proto comments never state: {missing}"


def test_protocol_limits_fields_quote_their_constant() -> None:
    """Each ProtocolLimits field's comment quotes the constant of the same name."""
    lines = (PROTO_DIR / "agent.proto").read_text().splitlines()
    start = lines.index("message ProtocolLimits {")
    comment: list[str] = []
    fields = 0
    for line in lines[start + 1 :]:
        stripped = line.strip()
        if stripped == "}":
            break
        if stripped.startswith("//"):
            comment.append(stripped)
            continue
        field = re.match(r"\w+ (\w+) = \d+;", stripped)
        assert field is not None, stripped
        constant = field.group(1).upper()
        assert f"{constant} ({getattr(wire_limits, constant)})" in " ".join(comment), field
        comment, fields = [], fields + 1
    assert fields >= 7


def test_protocol_version_is_the_quoted_one() -> None:
    text = (PROTO_DIR / "agent.proto").read_text()
    assert f"edgefarm.PROTOCOL_VERSION = {edgefarm.PROTOCOL_VERSION})" in text
    assert f"protocol_version is not {edgefarm.PROTOCOL_VERSION} " in text
