"""Summarise a py-spy ``--format raw`` profile (collapsed stacks) as hot-spot tables.

``py-spy record -f raw`` writes one line per distinct stack:
``frame;frame;...;leaf COUNT`` where a frame reads ``function (path:line)``.
This prints the share of samples spent *in* each function (self), under each
function (inclusive) and in each package, with paths shortened to
``package/module.py:function``.

usage: python bench/profile_summary.py PROFILE.txt [--top N]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>.*?)(?::(?P<line>\d+))?\)$")
_PREFIXES = (
    re.compile(r"^.*/site-packages/"),
    re.compile(r"^.*/lib/python3\.\d+/"),
)


def short_frame(frame: str, repo: str = "") -> str:
    """``func (/long/path/pkg/mod.py:12)`` -> ``pkg/mod.py:func``."""
    match = _FRAME.match(frame)
    if match is None:
        return frame or "?"
    path = match["path"]
    if repo and path.startswith(repo):
        path = path[len(repo):].lstrip("/")
    for prefix in _PREFIXES:
        path = prefix.sub("", path)
    return f"{path}:{match['func']}"


def package_of(short: str) -> str:
    """The package a short frame belongs to (``tooti/gateway`` keeps two levels)."""
    path = short.split(":", 1)[0]
    parts = path.split("/")
    if parts[0] == "tooti" and len(parts) > 2:
        return "/".join(parts[:2])
    if len(parts) == 1:
        return "stdlib" if path.endswith(".py") else path
    return parts[0]


@dataclass
class Profile:
    """Sample counts of one profile."""

    total: int = 0
    self_time: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    packages: Counter[str] = field(default_factory=Counter)


def load(path: Path, repo: str = "") -> Profile:
    """Read a raw py-spy profile."""
    profile = Profile()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [short_frame(f, repo) for f in stack.split(";")]
        profile.total += n
        profile.self_time[frames[-1]] += n
        profile.packages[package_of(frames[-1])] += n
        for frame in set(frames):
            profile.inclusive[frame] += n
    return profile


def summary(profile: Profile, title: str, top: int = 15, inclusive_filter: str = "tooti/") -> str:
    """Hot-spot tables of ``profile`` as text."""
    if profile.total == 0:
        return f"{title}: no samples"

    def rows(counter: Counter[str], n: int, keep: str = "") -> list[str]:
        items = [(k, v) for k, v in counter.most_common() if keep in k][:n]
        return [f"  {100 * v / profile.total:5.1f}%  {k}" for k, v in items]

    return "\n".join([
        f"{title}: {profile.total} samples",
        " self time by package:", *rows(profile.packages, 8),
        " self time by function:", *rows(profile.self_time, top),
        f" inclusive time, {inclusive_filter} functions:",
        *rows(profile.inclusive, top, inclusive_filter),
    ])


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent))
    args = parser.parse_args(argv)
    for path in args.profiles:
        print(summary(load(path, args.repo), str(path), args.top))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
