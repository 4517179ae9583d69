"""
A config file's bytes to composed YAML nodes, which keep the line and column
of every value, within bounds that a hostile or mistaken file cannot pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml

from .config_values import ConfigError, Problem

# A config is a few kilobytes; these bounds keep a hostile or mistaken
# file (a log, a core dump, an alias bomb) from costing time or memory.
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_NODES = 200_000
MAX_DEPTH = 64

# A mapping's entries by key: the key's node and the value's node.
Entries = dict[str, tuple[yaml.Node, yaml.Node]]

_TYPE_NAMES = {
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:null": "empty",
    "tag:yaml.org,2002:str": "a string",
}


def compose(data: bytes | str, source: str) -> yaml.Node | None:
    """
    The document in C{data} (UTF-8 bytes or text) as YAML nodes, or None
    for an empty one.

    @raise ConfigError: for a file too large, not UTF-8, not YAML, or
        nested too deep.
    """
    text = _decode(data, source)
    # libyaml's loader where PyYAML was built with it (not on PyPy).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        _check_depth(text, loader, source)
        return yaml.compose(text, Loader=loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = f"not valid YAML: {e.problem or e.context}"
        raise ConfigError([Problem(source, line, column, "", message)]) from None
    except yaml.YAMLError as e:
        raise ConfigError([Problem(source, 1, 1, "", f"not valid YAML: {e}")]) from None


def _decode(data: bytes | str, source: str) -> str:
    if len(data) > MAX_FILE_BYTES:
        message = f"the file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; is it a config?"
        raise ConfigError([Problem(source, 1, 1, "", message)])
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        message = f"byte 0x{data[e.start]:02x} is not UTF-8; save the file as UTF-8"
        raise ConfigError([Problem(source, line, column, "", message)]) from None


def _check_depth(text: str, loader: Any, source: str) -> None:
    """
    Refuse deep nesting before composing: the composer recurses once per
    level, and a few thousand brackets would crash the interpreter.
    (libyaml may refuse a very deep line first, with its own message.)
    """
    depth = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                mark: Any = event.start_mark
                message = f"nested more than {MAX_DEPTH} levels deep"
                raise ConfigError([Problem(source, mark.line + 1, mark.column + 1, "", message)])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def describe(node: yaml.Node) -> str:
    """How an error message names what the file gave."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    kind = _TYPE_NAMES.get(node.tag, "a value")
    if node.tag == "tag:yaml.org,2002:null":
        return kind
    return f"{kind} ({node.value!r})"


def is_null(node: yaml.Node | None) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def count_nodes(root: yaml.Node) -> int:
    """
    Nodes reachable from C{root}, counting each alias use again (the
    bomb's cost); counting stops past L{MAX_NODES}.
    """
    count = 0
    stack: list[yaml.Node] = [root]
    while stack and count <= MAX_NODES:
        node = stack.pop()
        count += 1
        stack.extend(_children(node))
    return count


def _children(node: yaml.Node) -> Iterator[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        yield from node.value
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield key
            yield value


def value_of(entries: Entries, key: str) -> yaml.Node | None:
    """The value node of C{key}, or None when the mapping lacks it."""
    entry = entries.get(key)
    return entry[1] if entry else None
