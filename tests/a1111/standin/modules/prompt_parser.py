"""Stand-in for modules/prompt_parser.py: AND composition (no prompt editing, no emphasis), SDXL's dict conds."""
import re

import torch

re_AND = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


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
    schedules = get_learned_conditioning(model, flat, steps)
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
    conds = model.get_learned_conditioning(list(prompts))
    rows = [{key: v[i] for key, v in conds.items()} for i in range(len(prompts))] if isinstance(conds, dict) else conds
    return [[ScheduledPromptConditioning(steps, cond)] for cond in rows]
