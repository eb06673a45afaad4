"""Stand-in for modules/prompt_parser.py: AND composition and emphasis (no prompt editing), SDXL's dict conds."""
import re

import torch

re_AND = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


re_emphasis = re.compile(r"\\(.)|(\()|(\[)|:\s*([+-]?[.\d]+)\s*\)|(\))|(\])|([^\\()\[\]:]+|:)", re.S)
re_break = re.compile(r"\s*\bBREAK\b\s*")


class SdConditioning(list):
    """The prompts of a batch with the size SDXL's conditioning is built for."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__(prompts)
        self.is_negative_prompt, self.width, self.height = is_negative_prompt, width, height


def parse_prompt_attention(text):
    """[[fragment, weight]]: "(a)" x1.1, "[a]" / 1.1, "(a:w)" x w, nested brackets multiply, "\\(" a literal
    bracket, a BREAK outside brackets is ["BREAK", -1]; neighbours of equal weight merged."""
    out, open_round, open_square = [], [], []

    def scale(start, factor):
        for item in out[start:]:
            item[1] *= factor

    for m in re_emphasis.finditer(text):
        literal, round_open, square_open, weight, round_close, square_close, plain = m.groups()
        if literal is not None:
            out.append([literal, 1.0])
        elif round_open:
            open_round.append(len(out))
        elif square_open:
            open_square.append(len(out))
        elif weight is not None and open_round:
            scale(open_round.pop(), float(weight))
        elif round_close and open_round:
            scale(open_round.pop(), 1.1)
        elif square_close and open_square:
            scale(open_square.pop(), 1 / 1.1)
        else:
            for k, part in enumerate(re_break.split(m.group(0))):
                if k:
                    out.append(["BREAK", -1])
                out.append([part, 1.0])
    for start in open_round:
        scale(start, 1.1)
    for start in open_square:
        scale(start, 1 / 1.1)
    merged = []
    for item in out:
        if item[0] == "" and item[1] != -1:
            continue
        if merged and merged[-1][1] == item[1] and item[1] != -1:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged or [["", 1.0]]


class ScheduledPromptConditioning:
    def __init__(self, end_at_step, cond):
        self.end_at_step, self.cond = end_at_step, cond


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules, self.weight = schedules, weight


class DictWithShape(dict):
    """SDXL's conditioning {"crossattn": (B, 77k, C), "vector": (B, adm)}; its shape is the crossattn one."""

    @property
    def shape(self):
        return self["crossattn"].shape


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape, self.batch = shape, batch


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    return [[[base_steps, prompt]] for prompt in prompts]


def get_multicond_prompt_list(prompts):
    res_indexes, flat, indexes_of = [], [], {}
    for prompt in prompts:
        indexes = []
        for sub in re_AND.split(prompt):
            text, weight = re_weight.search(sub).groups()
            if text not in indexes_of:
                indexes_of[text] = len(flat)
                flat.append(text)
            indexes.append((indexes_of[text], float(weight) if weight is not None else 1.0))
        res_indexes.append(indexes)
    return res_indexes, flat, indexes_of


def get_multicond_learned_conditioning(model, prompts, steps):
    res_indexes, flat, _ = get_multicond_prompt_list(prompts)
    size = dict(width=getattr(prompts, "width", None), height=getattr(prompts, "height", None))
    schedules = get_learned_conditioning(model, SdConditioning(flat, **size), steps)
    batch = [[ComposableScheduledPromptConditioning(schedules[i], w) for i, w in indexes] for indexes in res_indexes]
    return MulticondLearnedConditioning((len(prompts),), batch)


def stack_conds(conds):
    """Rows of different lengths are padded by repeating their last vector."""
    length = max(c.shape[0] for c in conds)
    return torch.stack([torch.cat([c, c[-1:].repeat(length - c.shape[0], 1)]) if c.shape[0] < length else c for c in conds])


def stack_rows(conds):
    """One batch from per-row conds; SDXL's dicts are stacked key by key."""
    if isinstance(conds[0], dict):
        return DictWithShape({key: stack_conds([c[key] for c in conds]) for key in conds[0]})
    return stack_conds(conds)


def reconstruct_multicond_batch(c, current_step):
    tensors, conds_list = [], []
    for composable in c.batch:
        conds_list.append([])
        for prompt in composable:
            conds_list[-1].append((len(tensors), prompt.weight))
            tensors.append(prompt.schedules[0].cond)
    return conds_list, stack_rows(tensors)


def reconstruct_cond_batch(c, current_step):
    return stack_rows([schedules[0].cond for schedules in c])


def get_learned_conditioning(model, prompts, steps):
    conds = model.get_learned_conditioning(prompts)
    rows = [{key: v[i] for key, v in conds.items()} for i in range(len(prompts))] if isinstance(conds, dict) else conds
    return [[ScheduledPromptConditioning(steps, cond)] for cond in rows]
