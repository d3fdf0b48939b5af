"""Tiny random-weight models exported by optimum-onnx (``optimum-cli export onnx --task text-generation-with-past``).

Run in a venv with transformers 4.57, optimum 2.1 and optimum-onnx 0.1 (torch 2.13):
    python make_exports.py OUT ARCH [ARCH ...]
Writes OUT/ARCH-hf (the model) and OUT/ARCH/model.onnx (optimum's graph: input_ids, attention_mask, position_ids
and past_key_values.N.key/value in, logits and present.N.key/value out) with the config.json optimum writes beside it.
"""
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

warnings.filterwarnings("ignore")
TOK = dict(vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=128, **TOK)
CONFIGS = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**DEC, num_key_value_heads=2)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**DEC, num_key_value_heads=2)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**DEC, num_key_value_heads=2, sliding_window=4)),
    "phi": lambda: T.PhiForCausalLM(T.PhiConfig(**{**DEC, "num_attention_heads": 2}, partial_rotary_factor=0.5)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**DEC, num_key_value_heads=2)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**DEC, num_key_value_heads=1, head_dim=32)),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**DEC, num_key_value_heads=2, head_dim=16,
                                                         sliding_window=4)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **TOK)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                               max_position_embeddings=128, word_embed_proj_dim=64, **TOK)),
    "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, initializer_range=0.05,
                                                      **TOK)),
    "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                         multi_query=True, parallel_attn=True, bias=False, alibi=False,
                                                         max_position_embeddings=128, **TOK)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**DEC, rotary_pct=0.25)),
    "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(n_embd=64, n_layer=2, n_head=2, n_inner=128, rotary_dim=16,
                                                   n_positions=128, **TOK)),
    "gpt_bigcode": lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, n_inner=128,
                                                                     n_positions=128, multi_query=True, **TOK)),
    "stablelm": lambda: T.StableLmForCausalLM(T.StableLmConfig(**DEC, num_key_value_heads=2, partial_rotary_factor=0.25,
                                                               use_qkv_bias=True)),
    "starcoder2": lambda: T.Starcoder2ForCausalLM(T.Starcoder2Config(**DEC, num_key_value_heads=2,
                                                                     sliding_window=None)),
    "granite": lambda: T.GraniteForCausalLM(T.GraniteConfig(**DEC, num_key_value_heads=2, embedding_multiplier=12.0,
                                                            attention_multiplier=0.05, residual_multiplier=0.22,
                                                            logits_scaling=8.0)),
    "olmo2": lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**DEC, num_key_value_heads=2)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**DEC, num_key_value_heads=2, head_dim=16)),
}


def tokenizer() -> T.PreTrainedTokenizerFast:
    vocab = {f"<{i}>": i for i in range(256)}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<0>", bos_token="<1>", eos_token="<2>")


def main(out: Path, archs: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for arch in archs:
        torch.manual_seed(0)
        folder = out / f"{arch}-hf"
        CONFIGS[arch]().eval().save_pretrained(folder)
        tokenizer().save_pretrained(folder)
        with tempfile.TemporaryDirectory() as scratch:
            subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "-m", str(folder),
                            "--task", "text-generation-with-past", scratch], check=True, capture_output=True)
            (out / arch).mkdir(exist_ok=True)
            for name in ("model.onnx", "config.json"):
                shutil.copy(Path(scratch) / name, out / arch / name)
        print("exported", arch)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
