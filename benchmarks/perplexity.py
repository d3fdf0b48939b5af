"""Perplexity of any decoder ONNX graph with a KV cache, fed one token at a time: the quality column of benchmarks.

Two tools' graphs are only comparable at a precision if they are measured
the same way, so this asks nothing of a graph but the cache contract both
onnxruntime-genai's builder and qgraph's ``ort`` presets follow: inputs
``input_ids``, ``attention_mask``, optionally ``position_ids``, and
``past_key_values.N.key/value`` [batch, kv heads, past, head size]; outputs
``logits`` (every position's or the last one's) and ``present.N.key/value``.
Each step feeds one token and the previous step's presents as the past
(the past grows by one: concat graphs and GroupQueryAttention graphs alike
take that), so the text is teacher-forced through the same cached path
generation takes.

The texts are several short paragraphs of different kinds (history,
science, recipe, news, code, story), written for this benchmark, so one
kind of text does not decide the figure; each starts with an empty cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["TEXTS", "next_token_losses", "perplexity", "stepwise_logits"]

TEXTS = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable "
    "metal type, oil-based ink and a wooden screw press into a system that could produce books far faster than any "
    "scribe. Within fifty years, presses were running in more than two hundred European cities, and the price of "
    "books fell so sharply that reading spread well beyond monasteries and courts.",
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light energy into chemical "
    "energy. Inside the chloroplasts, chlorophyll absorbs sunlight, and the plant uses that energy to split water "
    "molecules, releasing oxygen and storing energy in sugar that the plant later burns for growth.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])\n",
    "The mitochondrion is often called the powerhouse of the cell. It produces most of the chemical energy needed "
    "to power the cell's biochemical reactions, stored in a small molecule called adenosine triphosphate. "
    "Mitochondria contain their own small chromosomes and are thought to have descended from free-living bacteria.",
    "To make a simple tomato sauce, warm two tablespoons of olive oil in a pan, add a chopped onion and cook it "
    "slowly until soft. Stir in two cloves of garlic, then a can of crushed tomatoes, a pinch of salt and a few "
    "basil leaves. Let it simmer for twenty minutes, stirring now and then.",
    "The stock market fell sharply on Monday as investors worried about rising interest rates and slowing growth. "
    "Technology shares led the decline, while energy companies gained after oil prices climbed for the third day in "
    "a row. Analysts said the central bank's next decision would set the tone for the rest of the year.",
    "import numpy as np\n\ndef normalize(x, axis=-1, eps=1e-6):\n    mean = x.mean(axis=axis, keepdims=True)\n"
    "    var = x.var(axis=axis, keepdims=True)\n    return (x - mean) / np.sqrt(var + eps)\n",
    "Once upon a time, a young fox lived near a river. Every morning she ran to the water to drink, and every "
    "evening she watched the stars. One day an old turtle told her about a garden on the other side of the "
    "mountains.",
)

_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def stepwise_logits(session, ids: list[int], head_size: int | None = None) -> np.ndarray:
    """[len(ids), vocab] float32: the logits after each token, fed one at a time through the cache
    (``head_size``: for a graph that leaves it symbolic, as the builder's does)."""
    inputs = {i.name: i for i in session.get_inputs()}
    past = {}
    for name, info in inputs.items():
        if name.startswith("past_key_values."):
            _, heads, _, size = info.shape
            if not isinstance(size, int):
                size = head_size
            if not (isinstance(heads, int) and isinstance(size, int)):
                raise ValueError(f"{name}: kv heads and head size must be fixed (or head_size given), got {info.shape}")
            past[name] = np.zeros((1, heads, 0, size), _FLOAT.get(info.type, np.float32))
    wanted = ["logits", *(n.replace("past_key_values.", "present.") for n in past)]
    rows = []
    for step, token in enumerate(ids):
        feeds = {"input_ids": np.array([[token]], np.int64), "attention_mask": np.ones((1, step + 1), np.int64),
                 **past}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.array([[step]], np.int64)
        logits, *presents = session.run(wanted, feeds)
        rows.append(np.asarray(logits, np.float32).reshape(-1, logits.shape[-1])[-1])
        past = dict(zip(past, presents))
    return np.stack(rows)


def perplexity(model: Path, texts: list[list[int]], threads: int = 2) -> float:
    """exp of the mean next-token negative log-likelihood over every text (each from an empty cache)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    head_size = _head_size(Path(model).parent)
    return float(np.exp(np.mean(np.concatenate(
        [next_token_losses(stepwise_logits(session, ids, head_size), ids) for ids in texts]))))


def next_token_losses(logits: np.ndarray, ids) -> np.ndarray:
    """-log p(ids[t+1]) under the logits after ids[t], for every t but the last ([len(ids), vocab] logits)."""
    scores = logits[:-1].astype(np.float64)
    scores -= scores.max(-1, keepdims=True)
    log_probs = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(ids) - 1), np.asarray(ids)[1:]]


def _head_size(folder: Path) -> int | None:
    """The head size the folder's configuration states: genai_config.json's, else config.json's."""
    import json

    genai, hf = folder / "genai_config.json", folder / "config.json"
    if genai.exists():
        return json.loads(genai.read_text())["model"]["decoder"]["head_size"]
    if hf.exists():
        config = json.loads(hf.read_text())
        return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return None
