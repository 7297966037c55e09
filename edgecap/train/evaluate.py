"""Caption a split with any engine through the shared search, and score it."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from edgecap.runtime.decode import decode
from edgecap.runtime.engine import Engine
from edgecap.runtime.preprocess import Preprocessing
from edgecap.runtime.search import Hypothesis, SearchOptions
from edgecap.runtime.vocab import Vocabulary

from .data import Split
from .metrics import score_captions


def caption_split(engine: Engine, split: Split, preprocess: Preprocessing, opts: SearchOptions,
                  limit: int | None = None, features: torch.Tensor | None = None, batch_size: int = 32,
                  progress: bool = False) -> dict[str, Hypothesis]:
    """Best hypothesis per image key for the first `limit` images; `features` are cached regions [N, R, D]."""
    n = len(split) if limit is None else min(limit, len(split))
    out: dict[str, Hypothesis] = {}
    for lo in tqdm(range(0, n, batch_size), desc=f"caption {split.name}", disable=None if progress else True, leave=False):
        idx = range(lo, min(lo + batch_size, n))
        if features is not None:  # cached regions of a frozen encoder; pooled is their mean, as the encoder's
            regions = features[lo: lo + len(idx)].float().numpy()
            hyps = decode(engine, None, opts, features={"regions": regions, "pooled": regions.mean(1)})
        else:
            hyps = decode(engine, preprocess.batch([split.image(i) for i in idx]), opts)
        out.update((split.key(i), h[0]) for i, h in zip(idx, hyps))
    return out


def dev_scores(hyps: dict[str, Hypothesis], split: Split, vocab: Vocabulary) -> dict[str, float]:
    """CIDEr-D and BLEU-4 (simple tokenizer, no Java), exact-caption accuracy and distinct captions."""
    keys = [split.key(i) for i in range(len(split))]
    refs = {k: split.captions(i) for i, k in enumerate(keys) if k in hyps}
    texts = {k: vocab.decode(h.tokens) for k, h in hyps.items()}
    norm = {k: {vocab.decode(vocab.encode(r)) for r in rs} for k, rs in refs.items()}
    scores = score_captions(refs, texts, tokenizer="simple", metrics=("BLEU-4", "CIDEr-D"))
    return {"cider": scores["CIDEr-D"], "bleu4": scores["BLEU-4"],
            "exact": float(np.mean([texts[k] in norm[k] for k in texts])),
            "distinct": len(set(texts.values()))}
