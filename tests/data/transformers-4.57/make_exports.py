import sys, torch, warnings
warnings.filterwarnings("ignore")
import transformers as T
arch, exporter = sys.argv[1], sys.argv[2]
tok = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
cfgs = {
 "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **tok)),
 "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=4, max_position_embeddings=128, **tok)),
 "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64, **tok)),
 "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, **tok)),
 "phi": lambda: T.PhiForCausalLM(T.PhiConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=128, **tok)),
 "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4, initializer_range=0.05, **tok)),
 "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4, max_position_embeddings=128, **tok)),
 "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **tok)),
}
torch.manual_seed(0)
m = cfgs[arch]().eval()

class W(torch.nn.Module):
    def __init__(s, m): super().__init__(); s.m = m
    def forward(s, input_ids, attention_mask):
        return s.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
ids = torch.randint(3, 250, (2, 8)); mask = torch.ones(2, 8, dtype=torch.long); mask[0,:2]=0
path=f"/tmp/t457/{arch}-{exporter}.onnx"
if exporter == "dynamo":
    B=torch.export.Dim("batch"); S=torch.export.Dim("seq")
    torch.onnx.export(W(m), (ids, mask), path, dynamo=True, input_names=["input_ids","attention_mask"], output_names=["logits"],
        dynamic_shapes={"input_ids":{0:B,1:S},"attention_mask":{0:B,1:S}}, external_data=False)
else:
    torch.onnx.export(W(m), (ids, mask), path, dynamo=False, input_names=["input_ids","attention_mask"], output_names=["logits"],
        dynamic_axes={"input_ids":{0:"batch",1:"seq"},"attention_mask":{0:"batch",1:"seq"},"logits":{0:"batch",1:"seq"}}, opset_version=17)
print("ok", arch, exporter)
