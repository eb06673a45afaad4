"""Evaluation prompt sets for the bundled model, in the paper's protocol.

Candidates for positives are the duplicated captions; negatives come in four kinds (ordinary
training captions, novel combinations, another caption style, random token strings). Labels
are then set by outcome (does a generation copy a training image), never by intent.
"""
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from .data import Scene, TinyDataset, random_token_string

KINDS = ("memorized", "ordinary", "novel", "other_style", "random")


@dataclass
class EvalPrompt:
    text: str
    kind: str
    scene: Optional[Scene]   # what the caption describes (None for random strings)


def unique_captions(scenes) -> List[Scene]:
    """One scene per distinct caption, in first-seen order."""
    return list({s.caption(): s for s in scenes}.values())


def eval_prompts(ds: TinyDataset, per_kind: int = 100, seed: int = 1234) -> List[EvalPrompt]:
    rng = np.random.default_rng(seed)
    pick = lambda seq, n: [seq[i] for i in sorted(rng.choice(len(seq), min(n, len(seq)), replace=False))]
    out = [EvalPrompt(c, "memorized", s) for c, s in zip(ds.memorized_captions, ds.memorized_scenes)]
    ordinary, novel = unique_captions(ds.ordinary_train_scenes), unique_captions(ds.novel_scenes)
    out += [EvalPrompt(s.caption(), "ordinary", s) for s in pick(ordinary, per_kind)]
    out += [EvalPrompt(s.caption(), "novel", s) for s in pick(novel, per_kind)]
    out += [EvalPrompt(s.caption_other_style(), "other_style", s) for s in pick(ordinary + novel, per_kind)]
    training_garbage = set(ds.garbage_captions)
    randoms = []
    while len(randoms) < per_kind:
        text = random_token_string(rng)
        if text not in training_garbage:
            randoms.append(EvalPrompt(text, "random", None))
    return out + randoms
