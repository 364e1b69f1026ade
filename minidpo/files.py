"""Writing files so that a reader never sees half of one: write a temporary sibling, then rename.

The bottom layer: imports nothing from minidpo, and every module that writes a file uses it.
"""
import json
import os
from pathlib import Path


def write_atomic(path, data) -> Path:
    """Write `data` (str: UTF-8 text, bytes: as is) to `path` through `path.tmp` and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path, obj, *, indent=2, sort_keys=False) -> Path:
    """`obj` as JSON (non-ASCII kept as is) plus a newline, atomically."""
    return write_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def write_jsonl(path, rows) -> Path:
    """One JSON object a line (non-ASCII kept as is), atomically."""
    return write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_json(path):
    """The JSON value in `path`; a file that is not JSON raises ValueError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def parse_jsonl(data: bytes, path) -> list:
    """[(line number from 1, dict)] of the non-blank lines of a JSONL file's bytes; a line that is not
    a JSON object raises ValueError naming `path:line`."""
    out = []
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', e)})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        out.append((lineno, obj))
    return out
