"""Built-in pipelines, written as data in the structure of a TOML pipeline file.

A step is either ``{"pass": NAME}`` (optionally with ``"options": {...}``) or
``{"fixpoint": [NAME, ...], "max_iterations": N}``: the listed passes run in
order, again and again, until a whole round changes nothing or N rounds ran.
"""

from __future__ import annotations

__all__ = ["CLEANUP"]

# Folding exposes Identity chains and duplicates, merging duplicates leaves
# dead nodes, and removing dead nodes can make more nodes foldable (fewer
# users), so the four run to a fixpoint. Sorting and shape inference are
# needed once, on the cleaned graph.
CLEANUP: dict = {
    "steps": [
        {
            "fixpoint": ["constant-folding", "identity-elimination", "cse", "dce"],
            "max_iterations": 8,
        },
        {"pass": "topological-sort"},
        {"pass": "shape-inference"},
    ]
}
