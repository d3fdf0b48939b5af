"""A folder's tokenizer read with the ``tokenizers`` library alone: no transformers, no torch.

transformers' ``AutoTokenizer`` imports torch, which costs ``qgraph generate``
about 300 MiB of resident memory before the first token; onnxruntime-genai
reads the same ``tokenizer.json`` without it. :class:`LightTokenizer` loads
``tokenizer.json`` into a ``tokenizers.Tokenizer`` and applies what
transformers (5.x) takes from ``tokenizer_config.json`` on top of it, so
ids, text and chat prompts are the ones ``AutoTokenizer`` gives:

- named special tokens (``bos_token`` ... ``mask_token``, given as strings or
  as ``{"content": ...}``; ``special_tokens_map.json`` where the config has
  no ``added_tokens_decoder``) and extra special tokens become special added
  tokens when ``tokenizer.json`` does not hold them yet;
- the post-processor of ``tokenizer.json`` decides which tokens a text gets
  around it (BOS, ``[CLS] ... [SEP]``); the config's ``add_bos_token`` /
  ``add_eos_token`` are ignored, as transformers 5 ignores them whenever
  ``tokenizer.json`` exists;
- padding and truncation stored in ``tokenizer.json`` are off (transformers
  turns them off for a call that does not ask for them);
- ``split_special_tokens`` encodes special-token strings as text;
- ``clean_up_tokenization_spaces`` (" ." -> ".") applies to non-BPE models;
- the chat template comes from ``chat_template.jinja`` and
  ``additional_chat_templates/``, else from the config, and is rendered by
  :mod:`qgraph.runtime.chat_template` with the special tokens as variables.

The interface is the part of a Hugging Face tokenizer that the runtime uses:
``tok(text, add_special_tokens=...)["input_ids"]``, ``encode``, ``decode(ids,
skip_special_tokens=...)``, ``apply_chat_template``, ``chat_template`` and the
special tokens with their ids. A folder without ``tokenizer.json``
(sentencepiece or vocabulary files only) is left to ``AutoTokenizer``
(:meth:`qgraph.runtime.session.ModelFolder.tokenizer`). Some model-specific
tokenizer classes of transformers rebuild their pipeline from the vocabulary
instead of taking ``tokenizer.json`` whole; this reads ``tokenizer.json`` as
written, which is what such a class saved. tests/runtime/test_light_tokenizer.py
checks the folders the project meets (transformers 5's generic class, and a
``BertTokenizer`` folder written by older transformers).
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qgraph.errors import BadInputError
from qgraph.runtime.chat_template import pick_template, render_chat

__all__ = ["SPECIAL_TOKEN_NAMES", "LightTokenizer"]

#: transformers' named special tokens, in its order.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# transformers' clean-up of spaces a word-piece decoder leaves before punctuation and contractions.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class LightTokenizer:
    """``tokenizer.json`` + ``tokenizer_config.json``, behaving as transformers' tokenizer of the folder."""

    def __init__(self, backend: Any, *, special_tokens: Mapping[str, str], extra_special_tokens: Sequence[str] = (),
                 chat_template: str | dict[str, str] | None = None, clean_up_tokenization_spaces: bool = False,
                 source: str = "the tokenizer") -> None:
        self.backend = backend
        self.special_tokens_map = {name: special_tokens[name] for name in SPECIAL_TOKEN_NAMES
                                   if special_tokens.get(name) is not None}
        self.extra_special_tokens = list(extra_special_tokens)
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.source = source

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path) -> LightTokenizer:
        """The tokenizer of ``folder``, which must hold ``tokenizer.json``."""
        from tokenizers import AddedToken, Tokenizer

        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception for bad files
            raise BadInputError(f"{path}: the tokenizers library cannot read it ({error})") from None
        config = read_json_object(folder / CONFIG_FILE) or {}
        named = _named_special_tokens(folder, config)
        extra = _extra_special_tokens(config)

        # Special tokens the config names but tokenizer.json lacks are added, special (transformers does the same).
        present = {token.content for token in backend.get_added_tokens_decoder().values()}
        missing = [t for t in [*named.values(), *extra] if t not in present]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])

        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))

        clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        if clean_up and type(backend.model).__name__ == "BPE" and not config.get(
                "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"):
            clean_up = False  # transformers skips it for BPE: it would eat real spaces before punctuation
        return cls(backend, special_tokens=named, extra_special_tokens=extra,
                   chat_template=_chat_templates(folder, config), clean_up_tokenization_spaces=clean_up,
                   source=str(folder))

    # -- text -> ids -> text -------------------------------------------------------------

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        """``{"input_ids": [...], "attention_mask": [1, ...]}`` of one text, as a Hugging Face tokenizer gives."""
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise BadInputError(f"{self.source}: can only tokenize a string, got {type(text).__name__}")
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(ids)] if isinstance(ids, numbers.Integral) else [int(i) for i in ids]  # numpy ints, too
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    def apply_chat_template(self, conversation: Sequence[Mapping[str, Any]], *, tokenize: bool = True,
                            add_generation_prompt: bool = False, chat_template: str | None = None,
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            documents: Sequence[Mapping[str, Any]] | None = None, return_dict: bool = True,
                            **variables: Any) -> str | list[int] | dict[str, list[int]]:
        """The conversation as prompt text (``tokenize=False``), else its ids as transformers 5 returns them."""
        if not conversation:
            raise BadInputError("cannot apply a chat template to an empty conversation")
        template = pick_template(self.chat_template, name=chat_template, has_tools=tools is not None,
                                 source=self.source)
        text = render_chat(template, conversation, add_generation_prompt=add_generation_prompt, tools=tools,
                           documents=documents, special_tokens=self.special_tokens_map, source=self.source,
                           **variables)
        if not tokenize:
            return text
        return self(text, add_special_tokens=False) if return_dict else self.encode(text, add_special_tokens=False)

    # -- vocabulary -------------------------------------------------------------------------

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        tokens = dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens])
        return [i for i in (self.backend.token_to_id(t) for t in tokens) if i is not None]

    def __getattr__(self, name: str) -> Any:
        # bos_token, eos_token_id, pad_token, ... : None where the folder names no such token.
        if name in SPECIAL_TOKEN_NAMES:
            return self.__dict__.get("special_tokens_map", {}).get(name)
        if name.endswith("_id") and name[:-3] in SPECIAL_TOKEN_NAMES:
            token = self.__dict__.get("special_tokens_map", {}).get(name[:-3])
            return None if token is None else self.backend.token_to_id(token)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"LightTokenizer({self.source!r}, vocab={len(self)}, special={self.special_tokens_map})"


# -- tokenizer_config.json -------------------------------------------------------------------


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A folder's side file as a JSON object, None where it is absent; a broken one names the file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BadInputError(f"{path}: cannot read it as JSON ({error})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as the config writes it: a string, or an AddedToken dict with its ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _named_special_tokens(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    values = dict(config)
    if "added_tokens_decoder" not in config:  # the legacy file is read only then, and overrides the config
        values.update(read_json_object(folder / SPECIAL_TOKENS_MAP_FILE) or {})
    named = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(values.get(name))
        if text is not None:
            named[name] = text
    return named


def _extra_special_tokens(config: Mapping[str, Any]) -> list[str]:
    given = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    values = list(given.values()) if isinstance(given, Mapping) else list(given)
    # transformers 5 also treats any other "*_token" string of the config as a special token of the model
    values += [v for k, v in config.items() if k.endswith("_token") and k not in SPECIAL_TOKEN_NAMES
               and isinstance(v, (str, Mapping))]
    return [t for t in (_token_text(v) for v in values) if t is not None]


def _chat_templates(folder: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """Template files first (``chat_template.jinja``, ``additional_chat_templates/*.jinja``), else the config's."""
    found: dict[str, str] = {}
    default = folder / CHAT_TEMPLATE_FILE
    if default.is_file():
        found["default"] = default.read_text(encoding="utf-8")
    extra = folder / CHAT_TEMPLATE_DIR
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            found[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if list(found) == ["default"]:
        return found["default"]
    if found:
        return found
    given = config.get("chat_template")
    if isinstance(given, list):
        return {item["name"]: item["template"] for item in given}
    return given if isinstance(given, str) else None
