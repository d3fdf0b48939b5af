"""The ``qgraph`` command line; its commands and exit codes are a contract.

Exit codes (docs/design.md): 0 success, 1 a pass or check failed, 2 bad input or
usage. Nothing is written unless the whole pipeline succeeded, and the input
file is never overwritten.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from qgraph.errors import BadInputError, QGraphError

__all__ = ["entry", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors already; keep its message format."""


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qgraph", description="Verified graph-rewrite pipelines for exported ONNX transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    opt = sub.add_parser("optimize", help="run a pipeline of passes on a model")
    opt.add_argument("input", metavar="IN.onnx")
    opt.add_argument("-o", "--output", metavar="OUT.onnx")
    which = opt.add_mutually_exclusive_group()
    which.add_argument("--preset", metavar="NAME", help="a named pipeline (default: cleanup)")
    which.add_argument("--passes", nargs="+", metavar="P", help="passes to run, in order")
    which.add_argument("--pipeline", metavar="FILE.toml", help="a pipeline file (steps, options, fixpoint groups)")
    opt.add_argument("--precision", choices=("fp32", "int8", "int4"), default=None,
                     help="weights of the ort preset: fp32, or int8 / int4 (its ort-int8 / ort-int4 forms)")
    opt.add_argument("--option", action="append", default=[], metavar="PASS.KEY=VALUE", help="set a pass option (repeatable)")
    opt.add_argument("--verify", action="store_true", help="check equivalence after every pass that changed the model")
    opt.add_argument("--verify-examples", type=int, default=5, metavar="N", help="examples per --verify check (default 5)")
    opt.add_argument("--verify-keep", metavar="DIR", help="keep a failed --verify's inputs in DIR (default: not kept)")
    opt.add_argument("--report", metavar="R.json", help="write the per-pass report as JSON")
    opt.add_argument("--explain", metavar="RULE", help="list every candidate of RULE and why it did or did not match")
    opt.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto",
                     help="weights in OUT.onnx.data: auto (if the input had external data or >2 GB), yes, no")
    opt.add_argument("--no-check", action="store_true", help="skip the invariant checks between passes")

    sub.add_parser("passes", help="list the registered passes, one a line, with docs and options")

    ins = sub.add_parser("inspect", help="inputs, outputs, opsets, op histogram and parameters of a model")
    ins.add_argument("input", metavar="IN.onnx")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")

    chk = sub.add_parser("check", help="are two models equivalent? exit 0 equal, 1 differ, 2 bad input")
    chk.add_argument("reference", metavar="A.onnx")
    chk.add_argument("candidate", metavar="B.onnx")
    chk.add_argument("--examples", type=int, default=20, metavar="N")
    chk.add_argument("--keep", metavar="DIR", help="keep a failure's inputs in DIR for the reproduction command (default: not kept)")

    from qgraph.export.command import add_export_parser  # argparse only: cheap

    add_export_parser(sub)

    from qgraph.runtime.command import add_runtime_parsers  # argparse only: cheap

    add_runtime_parsers(sub)

    from qgraph.demo import add_demo_parser  # argparse only: cheap

    add_demo_parser(sub)

    from qgraph.infer_command import add_infer_parsers  # argparse only: cheap

    add_infer_parsers(sub)

    vr = sub.add_parser("verify-rules", help="self-check every registered rule: exit 0 all hold, 1 naming those that don't")
    vr.add_argument("--examples", type=int, default=8, metavar="N", help="inputs per pattern variant (default 8)")
    vr.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the drawn inputs (default 0)")
    vr.add_argument("--artifacts", metavar="DIR", help="where failing inputs and models go (default: a temporary folder)")
    vr.add_argument("--rule", action="append", default=[], metavar="NAME", help="only these rules (repeatable)")
    _add_plugin_option(parser, sub)
    return parser


def _add_plugin_option(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction) -> None:
    """``--plugin`` before or after any command (the env var QGRAPH_PLUGINS adds more)."""
    text = "load passes from a .py file or an importable module (repeatable; also QGRAPH_PLUGINS)"
    # A sub-command's values replace the top level's under one dest: keep two.
    parser.add_argument("--plugin", action="append", dest="plugins_first", default=[], metavar="FILE.py|MODULE",
                        help=text)
    for command in sub.choices.values():
        command.add_argument("--plugin", action="append", dest="plugins", default=argparse.SUPPRESS,
                             metavar="FILE.py|MODULE", help=text)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    from qgraph.signals import exit_code_of, terminations_as_interrupts
    from qgraph.warning_lines import warnings_as_lines

    out = out or sys.stdout
    command = "qgraph"
    try:
        with terminations_as_interrupts():
            parser = _build_parser()
            args = parser.parse_args(argv)
            command = f"qgraph {args.command}"
            with warnings_as_lines(command):
                return _run(parser, args, out)
    except KeyboardInterrupt as interrupt:
        how = getattr(interrupt, "signal_name", "Ctrl-C")
        print(f"{command}: interrupted ({how}); nothing written", file=sys.stderr)
        return exit_code_of(interrupt)


def entry() -> None:
    """The ``qgraph`` executable: :func:`main`, then an exit that does not collect what the process leaves.

    A command's model lives in reference cycles until the interpreter's last
    collection walks it at exit -- ~100k objects, 0.15 of the ~2 CPU seconds
    of ``qgraph optimize --preset ort`` on SmolLM2-135M. Everything a command
    writes is flushed, fsynced and closed before ``main`` returns, so those
    objects are left to the operating system with the process instead
    (``gc.freeze``: the last collection skips them; atexit handlers and
    weakref finalizers still run). ``main`` itself does not do this: tests
    and other tools call it in processes that go on.

    A command that runs a model starts itself again first, asking glibc for
    huge pages (qgraph/huge_pages.py). The executable also defers sympy (qgraph/deferred_imports.py), which
    onnx_ir imports eagerly and a command seldom uses; a program that
    imports qgraph as a library keeps its import system as it was.
    """
    from qgraph.huge_pages import restart_with_huge_pages

    restart_with_huge_pages(sys.argv[1:])  # generate, demo, ...: once more, with huge pages (qgraph/huge_pages.py)
    from qgraph.deferred_imports import DEFERRED, defer

    for name in DEFERRED:
        defer(name)
    code = main()
    gc.freeze()
    sys.exit(code)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, out: TextIO) -> int:
    try:
        _load_plugins([*args.plugins_first, *getattr(args, "plugins", [])])
        if args.command == "optimize":
            return _optimize(args, out)
        if args.command == "passes":
            return _passes(out)
        if args.command == "inspect":
            return _inspect(args, out)
        if args.command == "check":
            return _check(args, out)
        if args.command == "verify-rules":
            return _verify_rules(args, out)
        if args.command == "export":
            from qgraph.export.command import run_export

            return run_export(args, out)
        if args.command == "generate":
            from qgraph.runtime.command import run_generate

            return run_generate(args, out)
        if args.command == "embed":
            from qgraph.runtime.command import run_embed

            return run_embed(args, out)
        if args.command == "demo":
            from qgraph.demo import run_demo_command

            return run_demo_command(args, out)
        if args.command in ("infer", "compile", "execute"):
            from qgraph.infer_command import run_infer_command

            return run_infer_command(args, out)
    except QGraphError as exc:
        print(f"qgraph {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (`qgraph inspect X | head`): not an error of ours.
        sys.stderr.close()
        return 0
    except Exception:  # noqa: BLE001 - an internal bug still gets exit 1 and a trace
        traceback.print_exc()
        print(f"qgraph {args.command}: internal error (a bug in qgraph or a pass); nothing written", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


def _load_plugins(specs: list[str]) -> None:
    from qgraph.plugins import load_plugins, plugins_from_environment
    from qgraph.registry import default_registry

    load_plugins([*plugins_from_environment(), *specs], default_registry())


def _preset_at_precision(preset: str | None, precision: str | None) -> str:
    """--preset NAME --precision P: the preset of that target at that precision (ort + int4 -> ort-int4)."""
    if precision is None:
        return preset or "cleanup"
    variant = "-attention" if (preset or "").endswith("-attention") else ""  # ort-attention: the Attention-op form
    base = (preset or "").removesuffix(variant).removesuffix("-int8").removesuffix("-int4")
    if base != "ort":
        raise BadInputError(f"--precision is an option of the ort preset (int8/int4 quantize its weights); "
                            f"got --preset {preset or '(none)'}")
    chosen = (base if precision == "fp32" else f"{base}-{precision}") + variant
    if preset != base + variant and preset != chosen:
        raise BadInputError(f"--preset {preset} and --precision {precision} disagree; give one of them")
    return chosen


def _optimize(args: argparse.Namespace, out: TextIO) -> int:
    from qgraph import io
    from qgraph.explain_rule import ExplainHook
    from qgraph.manager import PassManager
    from qgraph.pipeline import Pipeline, parse_option_assignments
    from qgraph.registry import default_registry

    if args.output is None and args.explain is None:
        raise BadInputError("optimize needs -o OUT.onnx (or --explain RULE to only explain)")
    source = Path(args.input)
    if args.verify_examples < 1:
        raise BadInputError("--verify-examples must be at least 1")

    registry = default_registry()
    if args.precision and (args.passes or args.pipeline):
        raise BadInputError("--precision picks a form of the ort preset; with --passes or --pipeline, "
                            "add the quantize pass (--option quantize.bits=8|4) instead")
    if args.passes:
        pipeline = Pipeline(args.passes, name="command line")
    elif args.pipeline:
        pipeline = Pipeline.from_toml(args.pipeline)
    else:
        pipeline = Pipeline.from_preset(_preset_at_precision(args.preset, args.precision), registry)
    pipeline.set_options(parse_option_assignments(args.option))

    explain_hook = ExplainHook(args.explain, out, stop_after=args.output is None) if args.explain else None
    verifier = None
    if args.verify:
        from qgraph.verify import step_verifier

        verifier = step_verifier(examples=args.verify_examples, keep=args.verify_keep, clean_up=True)
    manager = PassManager(
        pipeline,
        registry=registry,
        check_invariants=not args.no_check,
        verifier=verifier,
        before_pass=explain_hook,
    )
    if explain_hook is not None:
        explain_hook.validate(manager)

    model = io.load(source)
    had_external_data = bool(io.files_read_by(model) - {source.resolve()})
    if args.output is not None:
        _check_destinations(args, source, model)
    report = manager.run(model)
    if explain_hook is not None:
        explain_hook.finish()
    if args.output is None:
        return 0

    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    if external is None and had_external_data:
        external = True
    extra = {args.report: report.to_json()} if args.report else {}
    io.save(model, args.output, external_data=external, protect=[source], extra_files=extra)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(report.format_table(), file=out)
    print(f"wrote {args.output}", file=out)
    return 0


def _check_destinations(args: argparse.Namespace, source: Path, model: object) -> None:
    """Every file this run writes, against its inputs and each other, before any pass runs."""
    from qgraph import io
    from qgraph.output_paths import check_destinations

    outputs = {"-o": args.output, "-o's external data file": io.data_path_for(args.output)}
    if args.report:
        outputs["--report"] = args.report
    inputs = [("the input model", source)] + [("a file the input reads", p) for p in sorted(io.files_read_by(model))]
    check_destinations(outputs, inputs)


def _passes(out: TextIO) -> int:
    from qgraph.registry import default_registry

    registry = default_registry()
    names = registry.names()
    width = max((len(n) for n in names), default=0)
    for name in names:
        cls = registry.get(name)
        line = f"{name.ljust(width)}  {cls.summary()}"
        if cls.options:
            opts = ", ".join(f"{k}={opt.default!r}" for k, opt in cls.options.items())
            line += f"  [options: {opts}]"
        if not registry.origin(name).startswith("package 'qgraph'"):
            line += f"  (from {registry.origin(name)})"
        print(line, file=out)
    for name, problem in sorted(registry.broken().items()):
        print(f"{name.ljust(width)}  (cannot be loaded: {problem})", file=out)
    return 0


def _inspect(args: argparse.Namespace, out: TextIO) -> int:
    from qgraph import io
    from qgraph.inspect_model import format_summary, summarize

    summary = summarize(io.load(args.input))
    if args.json:
        print(json.dumps(summary, indent=2), file=out)
    else:
        print(format_summary(summary), file=out)
    return 0


def _check(args: argparse.Namespace, out: TextIO) -> int:
    from qgraph.verify import check_files

    if args.examples < 1:
        raise BadInputError("--examples must be at least 1")
    return check_files(args.reference, args.candidate, examples=args.examples, out=out, keep=args.keep, clean_up=True)


def _verify_rules(args: argparse.Namespace, out: TextIO) -> int:
    from qgraph.registry import default_registry
    from qgraph.rewrite_pass import RewritePass
    from qgraph.verify.rule_check import check_rule

    registry = default_registry()
    wanted = set(args.rule)
    failed: list[str] = []
    seen: set[str] = set()
    for name in registry.names():
        cls = registry.get(name)
        if not issubclass(cls, RewritePass):
            continue
        for rule in cls().rule_set():
            if (wanted and rule.name not in wanted) or rule.name in seen:
                continue
            seen.add(rule.name)
            result = check_rule(rule, examples=args.examples, seed=args.seed, artifacts_dir=args.artifacts)
            print(f"{result} [pass {name}]", file=out)
            if not result.ok:
                failed.append(rule.name)
    missing = sorted(wanted - seen)
    if missing:
        raise BadInputError(f"no registered rule named {', '.join(map(repr, missing))}")
    print(f"{len(seen) - len(failed)} of {len(seen)} rule(s) hold" + (f"; failing: {', '.join(failed)}" if failed else ""), file=out)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    entry()
