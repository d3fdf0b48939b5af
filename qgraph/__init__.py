"""qgraph: declarative, verified rewrite passes over exported ONNX graphs."""

# Names are imported on first use: the CLI's entry point imports this package
# first, and everything imported here runs before the CLI can handle Ctrl-C
# (an interrupt during start-up printed a traceback).
from qgraph.lazy_exports import lazy_attributes

_HOMES = {
    "AutoModel": "auto",
    "AutoModelForCausalLM": "auto",
    "CommonLoader": "auto",
    "ExecInfo": "auto",
    "exec_kv": "auto",
    "load_hf_tokenizer": "auto",
    "optimize": "api",
    "optimize_with_report": "api",
    "BadInputError": "errors",
    "PassFailure": "errors",
    "QGraphError": "errors",
    "RewriteError": "errors",
    "PassManager": "manager",
    "PassRecord": "manager",
    "RunReport": "manager",
    "Option": "pass_base",
    "Pass": "pass_base",
    "PassReport": "pass_base",
    "Prerequisite": "pass_base",
    "Fixpoint": "pipeline",
    "Pipeline": "pipeline",
    "Registry": "registry",
    "default_registry": "registry",
    "Match": "rewrite",
    "Rule": "rewrite",
    "RuleSet": "rewrite",
    "apply_rules": "rewrite",
    "explain": "rewrite",
    "find_matches": "rewrite",
    "RewritePass": "rewrite_pass",
}

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

__getattr__, __dir__ = lazy_attributes(__name__, _HOMES, globals())
