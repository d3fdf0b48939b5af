"""qgraph: declarative, verified rewrite passes over exported ONNX graphs."""

from qgraph.api import optimize, optimize_with_report
from qgraph.auto import AutoModel, AutoModelForCausalLM, CommonLoader, ExecInfo, exec_kv, load_hf_tokenizer
from qgraph.errors import BadInputError, PassFailure, QGraphError, RewriteError
from qgraph.manager import PassManager, PassRecord, RunReport
from qgraph.pass_base import Option, Pass, PassReport, Prerequisite
from qgraph.pipeline import Fixpoint, Pipeline
from qgraph.registry import Registry, default_registry
from qgraph.rewrite import Match, Rule, RuleSet, apply_rules, explain, find_matches
from qgraph.rewrite_pass import RewritePass

__all__ = [
    "AutoModel",
    "AutoModelForCausalLM",
    "CommonLoader",
    "ExecInfo",
    "exec_kv",
    "load_hf_tokenizer",
    "BadInputError",
    "Fixpoint",
    "Match",
    "PassManager",
    "PassRecord",
    "Pipeline",
    "Registry",
    "RewritePass",
    "Rule",
    "RuleSet",
    "RunReport",
    "apply_rules",
    "default_registry",
    "explain",
    "find_matches",
    "optimize",
    "optimize_with_report",
    "Option",
    "Pass",
    "PassFailure",
    "PassReport",
    "Prerequisite",
    "QGraphError",
    "RewriteError",
]

__version__ = "0.1.0"
