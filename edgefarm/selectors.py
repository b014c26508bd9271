"""Device selectors: ``{"arch": "arm64", "label.rack": "a"}`` matched against device facts.

A selector maps a key to a wanted value. Keys and values compare case-insensitively.
A value may list alternatives ``a|b``; ``*`` means "any value, as long as the device
has the key". A key written ``!key`` (parsed from ``key!=value``) negates: the device
must have none of the values. Facts are sets of strings per key (see
:func:`device_facts`); a key matches when any of the device's values matches.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgefarm.domain import DeviceCapabilities

Selector = dict[str, str]
Facts = dict[str, set[str]]

BUILTIN_KEYS = frozenset(
    {"os", "arch", "cpu_flag", "accelerator", "backend", "name", "device_id", "hostname", "cores"}
)
ANY_VALUE = "*"

_OS_ALIASES: dict[str, set[str]] = {
    "linux": {"linux"},
    "darwin": {"darwin", "macos", "osx"},
    "macos": {"darwin", "macos", "osx"},
    "windows": {"windows", "win32"},
    "android": {"android", "linux"},
}

_ARCH_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"x86_64", "amd64", "x64"}),
    frozenset({"arm64", "aarch64"}),
    frozenset({"x86", "i386", "i686"}),
)


def parse_selector(items: list[str] | dict[str, str] | str) -> Selector:
    """Normalise a selector given as a mapping, a list of ``"key=value"`` or a comma string.

    ``"key!=value"`` becomes the negated key ``"!key"``. Keys are lowercased.
    Raises ``ValueError`` with a one-line message on a malformed item.
    """
    if isinstance(items, str):
        items = [part for part in items.split(",") if part.strip()]
    if isinstance(items, Mapping):
        pairs = [(str(key), _as_text(value, key)) for key, value in items.items()]
    elif isinstance(items, list):
        pairs = [_split_item(item) for item in items]
    else:
        raise ValueError(
            f"a selector must be a mapping or a list of 'key=value' strings, "
            f"not {type(items).__name__}"
        )
    selector: Selector = {}
    for raw_key, raw_value in pairs:
        key = raw_key.strip().lower()
        value = raw_value.strip()
        bare = key.removeprefix("!")
        if not bare or any(c in bare for c in "=!| \t"):
            raise ValueError(f"bad selector key {raw_key!r}")
        if not value:
            raise ValueError(f"selector key {bare!r} has an empty value")
        if key in selector:
            raise ValueError(f"selector key {key!r} is given twice")
        selector[key] = value
    return selector


def _split_item(item: object) -> tuple[str, str]:
    """``"k=v"`` -> ``("k", "v")``; ``"k!=v"`` -> ``("!k", "v")``."""
    if not isinstance(item, str):
        raise ValueError(f"bad selector item {item!r} (expected 'key=value' or 'key!=value')")
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"bad selector item {item!r} (expected 'key=value' or 'key!=value')")
    key = key.strip()
    if key.endswith("!"):
        key = "!" + key[:-1].rstrip()
    return key, value


def _as_text(value: object, key: object) -> str:
    """A scalar selector value as text (YAML gives ints and bools for ``cores: 4``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise ValueError(f"selector key {key!r} needs a single value, not {type(value).__name__}")


def arch_aliases(arch: str) -> set[str]:
    """Every spelling of an architecture name (``aarch64`` -> ``{aarch64, arm64}``)."""
    lowered = arch.strip().lower()
    for group in _ARCH_GROUPS:
        if lowered in group:
            return set(group)
    return {lowered} if lowered else set()


def os_aliases(os_name: str) -> set[str]:
    """Every spelling of an OS name (``Darwin`` -> ``{darwin, macos, osx}``)."""
    lowered = os_name.strip().lower()
    return set(_OS_ALIASES.get(lowered, {lowered} if lowered else set()))


def device_facts(capabilities: DeviceCapabilities, labels: Mapping[str, str], name: str) -> Facts:
    """The facts selectors are matched against, all lowercased.

    Keys: os, arch (with aliases), cpu_flag, accelerator, backend, name, device_id,
    hostname, cores (logical count), and each label as ``label.K`` and also bare
    ``K`` when ``K`` is not a built-in key.
    """
    caps = capabilities
    facts: Facts = {
        "os": os_aliases(caps.os),
        "arch": arch_aliases(caps.arch),
        "cpu_flag": {flag.lower() for flag in caps.cpu_flags if flag},
        "accelerator": {acc.lower() for acc in caps.accelerators if acc},
        "backend": {backend.lower() for backend in caps.backends},
        "name": {name.lower()} if name else set(),
        "device_id": {caps.device_id.lower()} if caps.device_id else set(),
        "hostname": _hostname_facts(caps.hostname),
        "cores": {str(caps.logical_cores)} if caps.logical_cores > 0 else set(),
    }
    for key, value in labels.items():
        lowered_key = key.strip().lower()
        values = {str(value).strip().lower()}
        facts[f"label.{lowered_key}"] = values
        if lowered_key not in BUILTIN_KEYS:
            facts[lowered_key] = values
    return facts


def _hostname_facts(hostname: str) -> set[str]:
    """The hostname, and its short form without the domain."""
    lowered = hostname.strip().lower()
    if not lowered:
        return set()
    return {lowered, lowered.split(".", 1)[0]}


def _key_matches(key: str, wanted: str, facts: Facts) -> bool:
    """Whether one selector entry holds for ``facts``."""
    negated = key.startswith("!")
    have = facts.get(key.removeprefix("!"), set())
    alternatives = {alt.strip().lower() for alt in wanted.split("|") if alt.strip()}
    hit = bool(have) if ANY_VALUE in alternatives else bool(have & alternatives)
    return not hit if negated else hit


def matches(selector: Mapping[str, str], facts: Facts) -> bool:
    """True when every entry of ``selector`` holds for ``facts`` (empty selects all)."""
    return all(_key_matches(key.lower(), value, facts) for key, value in selector.items())


def explain_mismatch(selector: Mapping[str, str], facts: Facts) -> str:
    """Why ``facts`` fail ``selector`` (first failing key), or ``""`` when they match."""
    for raw_key, wanted in selector.items():
        key = raw_key.lower()
        if _key_matches(key, wanted, facts):
            continue
        bare = key.removeprefix("!")
        have = sorted(facts.get(bare, set()))
        shown = ", ".join(have)
        if key.startswith("!"):
            return f"{bare} is {shown}, wanted anything but {wanted}"
        if not have:
            return f"device has no {bare}, wanted {wanted}"
        return f"{bare} is {shown}, wanted {wanted}"
    return ""
