"""Rendering a Hugging Face chat template without transformers.

A chat template is a Jinja template stored with the tokenizer
(``chat_template.jinja``, the ``additional_chat_templates/`` folder, or the
``chat_template`` entry of ``tokenizer_config.json``). Templates written for
transformers rely on the environment its ``apply_chat_template`` renders them
in, so the runtime renders them in an equivalent one: a sandboxed,
immutable Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, loop
controls (``{% break %}``), a ``{% generation %}`` block (transformers marks
assistant text with it; here it renders its body), ``raise_exception``,
``strftime_now``, a ``tojson`` that does not escape HTML, and ``dict`` /
``namespace`` that cannot reach Python internals. The variables are the
messages (keys whose value is None dropped), ``add_generation_prompt``,
``tools``, ``documents``, the tokenizer's named special tokens
(``bos_token``, ``eos_token``, ...) and the caller's keyword arguments.

jinja2 is imported on the first render only: ``qgraph generate`` without
``--chat`` never pays for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from qgraph.errors import BadInputError

__all__ = ["pick_template", "render_chat"]


def pick_template(templates: str | Mapping[str, str] | None, *, name: str | None = None,
                  has_tools: bool = False, source: str = "the tokenizer") -> str:
    """The template to render: the only one, the named one, ``tool_use`` for tools, else ``default``."""
    if templates is None:
        if name is not None and "{" in name:
            return name  # the caller passed a template of its own
        raise BadInputError(f"{source} has no chat template")
    if isinstance(templates, str):
        return name if name is not None else templates
    if name is not None:
        return templates.get(name, name)
    if has_tools and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise BadInputError(f"{source} has several chat templates and none is named 'default' "
                        f"({', '.join(sorted(templates))}); name one")


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                tools: Sequence[Mapping[str, Any]] | None = None, documents: Sequence[Mapping[str, Any]] | None = None,
                special_tokens: Mapping[str, str] | None = None, source: str = "the tokenizer", **variables: Any) -> str:
    """The conversation rendered by ``template`` (one conversation; no tokenizing).

    A template that fails to parse, or calls ``raise_exception``, is bad input
    named by ``source`` (the tokenizer folder).
    """
    import jinja2

    for message in messages:
        if not isinstance(message, Mapping):
            raise BadInputError(f"{source}: a chat message must be a mapping with 'role' and 'content', got {message!r}")
    chat = [{key: value for key, value in message.items() if value is not None} for message in messages]
    context = {**(special_tokens or {}), **variables}  # the caller's variables win over the special tokens
    try:
        compiled = _compiled(template)
    except jinja2.TemplateSyntaxError as error:
        raise BadInputError(f"{source}: its chat template does not parse (line {error.lineno}: {error.message})") from None
    try:
        return compiled.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **context)
    except jinja2.TemplateError as error:
        raise BadInputError(f"{source}: its chat template refused the conversation: {error}") from None


@lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_generation_block_class(), jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    environment.globals["dict"] = _SafeDict()
    environment.globals["namespace"] = _namespace_class()
    return environment.from_string(template)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


class _SafeDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` in a template, without the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args)


@lru_cache(maxsize=1)
def _namespace_class() -> type:
    import jinja2.exceptions
    import jinja2.utils

    class SafeNamespace(jinja2.utils.Namespace):
        """jinja2's namespace refusing underscore names (no way to CPython internals through it)."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja2's own signature trick
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                SafeNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            SafeNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

    return SafeNamespace


@lru_cache(maxsize=1)
def _generation_block_class() -> type:
    import jinja2.ext
    import jinja2.nodes

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: rendered as its body (no assistant mask here)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    return GenerationBlock
