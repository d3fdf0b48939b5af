"""qgraph: declarative, verified rewrite passes over exported ONNX graphs."""

from qgraph.errors import BadInputError, PassFailure, QGraphError, RewriteError
from qgraph.pass_base import Option, Pass, PassReport, Prerequisite

__all__ = [
    "BadInputError",
    "Option",
    "Pass",
    "PassFailure",
    "PassReport",
    "Prerequisite",
    "QGraphError",
    "RewriteError",
]

__version__ = "0.1.0"
