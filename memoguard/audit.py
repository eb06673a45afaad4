"""The fine-tuner's audit: which captions of a dataset a model (or a LoRA on it) recalls, with the evidence.

Every caption of a training folder (memoguard.evidence's index: the images and their kohya-style captions) is
scored at the first step, as `scan` scores a prompt, on the model and — with a LoRA — on the model with the LoRA:
the change is what the LoRA added. Captions are ranked by that change (by the score where there is no LoRA); the top
ones are sampled, and each image's nearest training image (and whether it is one of the caption's own images) is the
evidence. `write_report` makes the HTML page.
"""
import html
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .evidence import Match, TrainingIndex, card_base64


@dataclass
class CaptionRecord:
    caption: str
    files: List[str]                  # the dataset's images with this caption
    score: float                      # first-step score on the audited model (with the LoRA where given)
    base_score: Optional[float] = None  # without the LoRA (None: no LoRA)
    flagged: Optional[bool] = None    # against the audited model's calibration (None: none)

    @property
    def added(self) -> Optional[float]:
        """What the LoRA added to the caption's score."""
        return None if self.base_score is None else self.score - self.base_score

    def to_dict(self) -> dict:
        return {**asdict(self), "added": self.added}


@dataclass
class Evidence:
    """Generations of one caption and their nearest training images."""
    caption: str
    matches: List[Match] = field(default_factory=list)
    cards: List[str] = field(default_factory=list)  # PNG as base64, one per generation
    own: List[bool] = field(default_factory=list)   # whether the nearest image is one of the caption's own

    def to_dict(self) -> dict:
        return {"caption": self.caption, "matches": [m.to_dict() for m in self.matches], "own": self.own}


def caption_files(index: TrainingIndex) -> Dict[str, List[str]]:
    """{caption: its images}, captions in the order of their first image; images without a caption left out."""
    out: Dict[str, List[str]] = {}
    for file, caption in zip(index.files, index.captions):
        if caption:
            out.setdefault(caption, []).append(file)
    return out


def rank(records: Sequence[CaptionRecord]) -> List[CaptionRecord]:
    """Highest recall first: by what the LoRA added where there is a LoRA, else by the score."""
    return sorted(records, key=lambda r: -(r.added if r.added is not None else r.score))


def gather_evidence(index: TrainingIndex, record: CaptionRecord, images, model_key: Optional[str]) -> Evidence:
    """The caption's generations (N, H, W, 3 uint8) beside their nearest training images."""
    evidence = Evidence(record.caption)
    for image, match in zip(images, index.nearest(images, model_key)):
        evidence.matches.append(match)
        evidence.cards.append(card_base64(index, image, match))
        evidence.own.append(match.file in record.files)
    return evidence


def write_report(path, title: str, records: Sequence[CaptionRecord], evidence: Sequence[Evidence],
                 notes: Sequence[str] = ()) -> None:
    """The audit as one HTML page: the sampled captions' cards, highest recall first, then the whole ranking."""
    from .report import html_page
    lora = any(r.base_score is not None for r in records)
    head = "<tr><th>#</th><th>caption</th><th>images</th><th>score</th>" + (
        "<th>without LoRA</th><th>added by LoRA</th>" if lora else "") + "<th>verdict</th></tr>"
    rows = []
    for k, r in enumerate(records, 1):
        verdict = {True: '<span class="flag">flagged</span>', False: '<span class="ok">ok</span>',
                   None: "uncalibrated"}[r.flagged]
        extra = f"<td>{r.base_score:.4f}</td><td>{r.added:+.4f}</td>" if r.base_score is not None else (
            "<td></td><td></td>" if lora else "")
        rows.append(f"<tr><td>{k}</td><td>{html.escape(r.caption)}</td><td>{len(r.files)}</td>"
                    f"<td>{r.score:.4f}</td>{extra}<td>{verdict}</td></tr>")
    parts = [f"<p>{html.escape(n)}</p>" for n in notes]
    for k, e in enumerate(evidence, 1):  # the highest-recall captions first, with what they make
        own = sum(e.own)
        parts.append(f"<h2>{k}. {html.escape(e.caption)}</h2><p>{own} of {len(e.own)} generations are nearest to "
                     f"one of this caption's own images</p>")
        parts += [f'<img alt="generation and nearest training image" src="data:image/png;base64,{c}">'
                  for c in e.cards]
    parts.append(f"<h2>Every caption by recall</h2><table>{head}{''.join(rows)}</table>")
    Path(path).write_text(html_page(title, parts), encoding="utf-8")
