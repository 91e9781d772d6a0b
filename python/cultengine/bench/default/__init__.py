"""The benchmark `cultengine bench` runs when given no `--data`: drawn flags + questions."""

from .questions import VERSION, build, corpus, rows

__all__ = ["VERSION", "build", "corpus", "rows"]
