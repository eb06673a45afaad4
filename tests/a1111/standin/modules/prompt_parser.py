"""Stand-in for modules/prompt_parser.py: AND composition (no prompt editing, no emphasis)."""
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
    conds = model.get_learned_conditioning(flat)
    batch = [[ComposableScheduledPromptConditioning([ScheduledPromptConditioning(steps, conds[i])], w) for i, w in indexes]
             for indexes in res_indexes]
    return MulticondLearnedConditioning((len(prompts),), batch)


def stack_conds(conds):
    """Rows of different lengths are padded by repeating their last vector."""
    length = max(c.shape[0] for c in conds)
    return torch.stack([torch.cat([c, c[-1:].repeat(length - c.shape[0], 1)]) if c.shape[0] < length else c for c in conds])


def reconstruct_multicond_batch(c, current_step):
    tensors, conds_list = [], []
    for composable in c.batch:
        conds_list.append([])
        for prompt in composable:
            conds_list[-1].append((len(tensors), prompt.weight))
            tensors.append(prompt.schedules[0].cond)
    return conds_list, stack_conds(tensors)


def reconstruct_cond_batch(c, current_step):
    return stack_conds([schedules[0].cond for schedules in c])


def get_learned_conditioning(model, prompts, steps):
    conds = model.get_learned_conditioning(list(prompts))
    return [[ScheduledPromptConditioning(steps, cond)] for cond in conds]
