"""Tiny random-weight transformers for tests: every architecture family, exported by both exporters.

Passes are only as good as the graphs they meet, and the graphs differ by
architecture as much as by exporter. Each entry of :data:`TINY_ARCHS` is a
transformers config shrunk to 2 layers, hidden size 64 and a 256-token
vocabulary (byte-level tokenizer), chosen for what makes its graph different:

===========  ===================================================================
llama        GQA (4 query heads, 2 KV heads), RoPE, RMSNorm, SwiGLU
qwen2        like llama, plus biases on q/k/v
phi3         fused qkv_proj and gate_up_proj
gemma        head_dim 32 != hidden/heads (16), multi-query (1 KV head),
             (1 + w) RMSNorm, embeddings scaled by sqrt(hidden), GeLU-tanh MLP
gpt2         fused c_attn (Conv1D), learned positions, LayerNorm, GeLU
opt          learned positions offset by 2, computed from the mask; ReLU
bert         encoder (bidirectional), token types, LayerNorm; mean-pooled embedding
mistral      sliding-window attention (window 4, smaller than the test sequences)
qwen3        RMSNorm on q and k per head
gemma2       attention and final-logit soft-capping, alternating sliding window,
             four norms per layer (transformers traces it with eager attention)
phi          partial rotary (16 of 32 dims: 2 heads), parallel attention and MLP
bloom        ALiBi position biases (no position embeddings, no rotary), fused
             query_key_value, LayerNorm on the embeddings
gpt_bigcode  multi-query attention (4 query heads, 1 KV head, fused c_attn),
             learned positions
smollm3      NoPE: layer 0 rotates q/k, layer 1 has no positions at all
             (``no_rope_layers=[1, 0]``); GQA 4/2
gpt_neo      global then local attention (window 4, smaller than the test
             sequences), learned positions, unscaled attention scores
gptj         interleaved partial rotary (16 of 32 dims: 2 heads, rotated in pairs), its
             sin/cos gathered from a table by position, parallel attention
             and MLP (the dynamo export reshapes them with the traced batch of
             1, so kv-cache tabulates them)
gpt_neox     partial rotary (a quarter of head_dim), fused query_key_value
             laid out head by head, parallel attention and MLP, LayerNorm
stablelm     partial rotary (a quarter of head_dim), biases on q/k/v,
             LayerNorm; GQA 4/2
granite      scalar multipliers: embeddings x12, attention scale 0.05 (not
             1/sqrt(head_dim)), residual branches x0.22, logits /8; GQA 4/2
olmo2        RMSNorm after attention and after the MLP (not before), RMSNorm
             over the whole q and k projections; GQA 4/2
starcoder2   GQA 4/2 with biases everywhere, LayerNorm, GeLU MLP
falcon       multi-query (1 KV head) fused query_key_value; attention and MLP
             in parallel from one LayerNorm; RoPE
llama3_rope  llama with llama3 rotary scaling (factor 8 over 16 original
             positions): cos/sin tables that are not the default frequencies'
===========  ===================================================================

Every causal LM exports in both wrapper modes (:func:`export_tiny`'s
``wrapper``): "qgraph" passes positions from the mask, "plain" is what a
user's plain ``torch.onnx.export(model, (input_ids, attention_mask))``
traces, positions counted by the model itself.

Mixture-of-experts models (Mixtral, Qwen2-MoE) are not in the zoo: torch
2.13 cannot export them (see README.md, export section). Neither is Cohere:
torch's TorchScript exporter traces one of its attention Reshapes with a
wrong size (``qgraph export`` refuses that graph, naming the node); its
dynamo export passes kv-cache's replays.

Weights are random (seeded, so every process builds the same bytes) at the
architecture's own init scale (Bloom's raised, see :func:`_bloom`). Each model is written as an ordinary
Hugging Face folder with a byte-level tokenizer (id = byte value) and goes
through exactly the path a user's model takes (:func:`export_model`), cache
included.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qgraph.export.cache import make_temp_folder
from qgraph.export.frontend import ExportResult, export_model
from qgraph.export.progress import Progress

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "TINY_ARCHS", "TinyArch", "build_tiny", "export_tiny", "tiny_config", "write_tiny_folder", "write_tiny_gguf",
]

VOCAB, HIDDEN, LAYERS, HEADS, FFN, POSITIONS = 256, 64, 2, 4, 128, 128
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# What every decoder config spelled with the usual names shares; each builder adds what its architecture is.
_DECODER = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "max_position_embeddings": POSITIONS, **_TOKENS}


@dataclass(frozen=True)
class TinyArch:
    name: str
    task: str                       #: "causal-lm" or "embedding"
    traits: str                     #: what is special about its graph
    make_config: Callable[[], Any]  #: builds the transformers config


def _llama():
    from transformers import LlamaConfig

    return LlamaConfig(**_DECODER, num_key_value_heads=2)


def _qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(**_DECODER, num_key_value_heads=2, tie_word_embeddings=False)


def _phi3():
    from transformers import Phi3Config

    return Phi3Config(**_DECODER, num_key_value_heads=2, original_max_position_embeddings=POSITIONS)


def _gemma():
    from transformers import GemmaConfig

    return GemmaConfig(**_DECODER, num_key_value_heads=1, head_dim=32)


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                      n_positions=POSITIONS, **_TOKENS)


def _opt():
    from transformers import OPTConfig

    return OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN,
                     **_TOKENS)


def _mistral():
    from transformers import MistralConfig

    return MistralConfig(**_DECODER, num_key_value_heads=2, sliding_window=4)


def _qwen3():
    from transformers import Qwen3Config

    return Qwen3Config(**_DECODER, num_key_value_heads=2, head_dim=16)


def _gemma2():
    from transformers import Gemma2Config

    return Gemma2Config(**_DECODER, num_key_value_heads=2, head_dim=16, sliding_window=4)


def _phi():
    from transformers import PhiConfig

    # 2 heads of 32: a rotated half of 16 channels, which onnxruntime's GroupQueryAttention turns itself (a
    # multiple of 16); GPT-NeoX's and StableLM's 4 of 16 stay the partial rotations it cannot take.
    return PhiConfig(**{**_DECODER, "num_attention_heads": 2}, partial_rotary_factor=0.5)


def _bloom():
    from transformers import BloomConfig

    # Init std 0.05, not Bloom's 0.02: Bloom layer-normalizes the embeddings, so at 0.02 the attention of a
    # 64-wide model barely moves the logits and the mask's effect would hide below a few hundred tolerances.
    return BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, initializer_range=0.05,
                       **_TOKENS)


def _gpt_bigcode():
    from transformers import GPTBigCodeConfig

    return GPTBigCodeConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                            n_positions=POSITIONS, multi_query=True, **_TOKENS)


def _smollm3():
    from transformers import SmolLM3Config

    # no_rope_layers[i] == 1: layer i uses RoPE; 0: no positions at all (NoPE).
    return SmolLM3Config(**_DECODER, num_key_value_heads=2, no_rope_layers=[1, 0])


def _gpt_neo():
    from transformers import GPTNeoConfig

    return GPTNeoConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                        intermediate_size=FFN, attention_types=[[["global", "local"], LAYERS // 2]], window_size=4,
                        max_position_embeddings=POSITIONS, **_TOKENS)


def _gptj():
    from transformers import GPTJConfig

    # rotary_dim 16 of head_dim 32 (2 heads): partial rotary, rotated in interleaved pairs (rotate_every_two).
    return GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_inner=FFN, rotary_dim=16,
                      n_positions=POSITIONS, **_TOKENS)


def _gpt_neox():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**_DECODER, rotary_pct=0.25)


def _stablelm():
    from transformers import StableLmConfig

    return StableLmConfig(**_DECODER, num_key_value_heads=2, partial_rotary_factor=0.25, use_qkv_bias=True)


def _granite():
    from transformers import GraniteConfig

    return GraniteConfig(**_DECODER, num_key_value_heads=2, embedding_multiplier=12.0, attention_multiplier=0.05,
                         residual_multiplier=0.22, logits_scaling=8.0)


def _olmo2():
    from transformers import Olmo2Config

    return Olmo2Config(**_DECODER, num_key_value_heads=2)


def _starcoder2():
    from transformers import Starcoder2Config

    return Starcoder2Config(**_DECODER, num_key_value_heads=2, sliding_window=None)


def _falcon():
    from transformers import FalconConfig

    return FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        multi_query=True, parallel_attn=True, bias=False, alibi=False,
                        max_position_embeddings=POSITIONS, **_TOKENS)


def _llama3_rope():
    from transformers import LlamaConfig

    return LlamaConfig(**_DECODER, num_key_value_heads=2,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 16})


def _bert():
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, max_position_embeddings=POSITIONS, pad_token_id=0)


#: The zoo, by name.
TINY_ARCHS: dict[str, TinyArch] = {
    arch.name: arch
    for arch in (
        TinyArch("llama", "causal-lm", "GQA 4/2 heads, RoPE, RMSNorm, SwiGLU", _llama),
        TinyArch("qwen2", "causal-lm", "GQA, biases on q/k/v", _qwen2),
        TinyArch("phi3", "causal-lm", "fused qkv_proj and gate_up_proj", _phi3),
        TinyArch("gemma", "causal-lm", "head_dim 32 != hidden/heads, MQA, (1+w) RMSNorm, scaled embeddings", _gemma),
        TinyArch("gpt2", "causal-lm", "fused c_attn (Conv1D), learned positions, LayerNorm", _gpt2),
        TinyArch("opt", "causal-lm", "learned positions from the mask (offset 2), ReLU", _opt),
        TinyArch("bert", "embedding", "bidirectional encoder, token types; mean pooling", _bert),
        TinyArch("mistral", "causal-lm", "sliding-window attention (window 4)", _mistral),
        TinyArch("qwen3", "causal-lm", "RMSNorm on q and k per head", _qwen3),
        TinyArch("gemma2", "causal-lm", "attention and final-logit soft-capping, alternating sliding window, "
                                        "eager attention, four norms per layer", _gemma2),
        TinyArch("phi", "causal-lm", "partial rotary (16 of 32 dims), parallel attention and MLP, "
                                     "dense with biases", _phi),
        TinyArch("bloom", "causal-lm", "ALiBi position biases (no position embeddings), fused qkv, "
                                       "LayerNorm on the embeddings", _bloom),
        TinyArch("gpt_bigcode", "causal-lm", "multi-query attention (fused c_attn: 4 query heads, 1 KV head), "
                                             "learned positions", _gpt_bigcode),
        TinyArch("smollm3", "causal-lm", "NoPE: layer 0 RoPE, layer 1 no positions at all; GQA 4/2", _smollm3),
        TinyArch("gpt_neo", "causal-lm", "global then local attention (window 4), learned positions, "
                                         "unscaled attention", _gpt_neo),
        TinyArch("gptj", "causal-lm", "interleaved partial rotary (16 of 32 dims, pairs), sin/cos read from a "
                                      "table by position, parallel attention and MLP", _gptj),
        TinyArch("gpt_neox", "causal-lm", "partial rotary (a quarter of head_dim), fused query_key_value laid out "
                                          "per head, parallel attention and MLP, LayerNorm", _gpt_neox),
        TinyArch("stablelm", "causal-lm", "partial rotary (a quarter of head_dim), biases on q/k/v, LayerNorm; "
                                          "GQA 4/2", _stablelm),
        TinyArch("granite", "causal-lm", "multipliers: embeddings x12, attention scale 0.05, residual x0.22, "
                                         "logits /8; GQA 4/2", _granite),
        TinyArch("olmo2", "causal-lm", "RMSNorm after attention and MLP (not before), RMSNorm over whole q and k; "
                                       "GQA 4/2", _olmo2),
        TinyArch("starcoder2", "causal-lm", "GQA 4/2 with biases everywhere, LayerNorm, GeLU MLP", _starcoder2),
        TinyArch("falcon", "causal-lm", "multi-query (1 KV head) fused query_key_value, attention and MLP in parallel "
                                        "from one LayerNorm, RoPE", _falcon),
        TinyArch("llama3_rope", "causal-lm", "llama with llama3 rotary scaling (factor 8 over 16 original positions): "
                                             "cos/sin tables that are not the default frequencies'", _llama3_rope),
    )
}


def _arch(name: str) -> TinyArch:
    try:
        return TINY_ARCHS[name]
    except KeyError:
        raise ValueError(f"no tiny model {name!r}; the zoo has {', '.join(TINY_ARCHS)}") from None


def tiny_config(name: str) -> Any:
    """The transformers config of a zoo architecture (2 layers, hidden 64, vocab 256)."""
    arch = _arch(name)
    config = arch.make_config()
    model_class = _model_class(config, arch.task)
    config.architectures = [model_class.__name__]
    return config


def _model_class(config: Any, task: str) -> type:
    import transformers
    from transformers.models.auto import modeling_auto

    names = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if task == "causal-lm" else modeling_auto.MODEL_MAPPING_NAMES
    return getattr(transformers, names[config.model_type])


def build_tiny(name: str, seed: int = 0) -> nn.Module:
    """The random-weight model (eval mode, float32); the same bytes for the same seed in every process."""
    import torch

    config = tiny_config(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _model_class(config, _arch(name).task)(config)
    return model.eval()


def _byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer without merges: token id = byte value (exactly 256 tokens)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # GPT-2's byte -> printable-character table, so id i is byte i.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            codes[byte] = byte
        else:
            codes[byte] = 256 + extra
            extra += 1
    vocab = {chr(codes[byte]): byte for byte in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def write_tiny_folder(name: str, folder: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write the zoo model as a Hugging Face folder (config, safetensors, tokenizer); returns it.

    An existing complete folder is kept. The folder appears atomically, so
    processes writing the same one at once (pytest-xdist workers) are safe.
    """
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = make_temp_folder(folder.parent, f".{folder.name}.tmp-")
    try:
        build_tiny(name, seed).save_pretrained(staging)
        _byte_tokenizer().save_pretrained(staging)
        try:
            os.replace(staging, folder)
        except OSError:
            if not (folder / "model.safetensors").is_file():
                raise  # not "another process won the race"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write_tiny_gguf(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write the zoo's Llama as a float32 GGUF file, laid out as llama.cpp's converter lays it out.

    Loading it with transformers gives back exactly :func:`build_tiny`
    ("llama", seed): q/k rows are permuted the way llama.cpp stores them for
    its RoPE (transformers undoes it), and the byte-level tokenizer goes into
    the GGUF metadata. It lets the GGUF path (dequantize, cache, export) be
    tested in a second instead of the ~40 s of the real SmolLM2.
    """
    import gguf
    import numpy as np

    path = Path(path)
    model = build_tiny("llama", seed)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads

    def llama_cpp_rope_order(weight: np.ndarray, heads: int) -> np.ndarray:
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in per_layer.items():
            names[f"model.layers.{layer}.{hf_name}.weight"] = f"blk.{layer}.{gguf_name}.weight"

    vocab = sorted(_byte_tokenizer().get_vocab().items(), key=lambda item: item[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("qgraph tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}  # transformers 5 / 4
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([1] * len(vocab))
    writer.add_token_scores([0.0] * len(vocab))
    writer.add_token_merges([])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    for name, tensor in model.state_dict().items():
        weight = tensor.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            weight = llama_cpp_rope_order(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = llama_cpp_rope_order(weight, config.num_key_value_heads)
        writer.add_tensor(names[name], np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def export_tiny(
    name: str,
    exporter: str,
    folder: str | os.PathLike[str],
    *,
    opset: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    wrapper: str = "qgraph",
    **options: Any,
) -> ExportResult:
    """Export the zoo model ``name`` with ``exporter`` into ``folder/<name>-<exporter>/``.

    The Hugging Face folder goes to ``folder/<name>-hf/``. ``wrapper``
    ("qgraph" or "plain", see :func:`export_model`) picks the traced module;
    a plain export goes to ``folder/<name>-<exporter>-plain/``. ``options`` are
    passed to :func:`export_model` (``pooling``, ``attn_implementation``...).
    Cached like any export: a second call (any process, same cache) is a copy.
    """
    folder = Path(folder)
    source = write_tiny_folder(name, folder / f"{name}-hf")
    suffix = "".join(f"-{value}" for value in options.values() if value is not None)
    if wrapper != "qgraph":
        suffix += f"-{wrapper}"
    return export_model(
        source, folder / f"{name}-{exporter}{suffix}", exporter=exporter, opset=opset, wrapper=wrapper,
        cache_dir=cache_dir, progress=progress, **options,
    )
