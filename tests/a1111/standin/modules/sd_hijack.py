"""Stand-in for modules/sd_hijack.py: model_hijack.clip tokenizes prompts into 77-token chunks, with emphasis
weights as multipliers and BREAK starting a chunk."""
from types import SimpleNamespace

import torch

from modules import prompt_parser, shared


class PromptChunk:
    def __init__(self):
        self.tokens, self.multipliers, self.fixes = [], [], []


class ChunkingTokenizer:
    """BOS + up to 75 tokens + EOS per chunk, padded with id_pad, as the WebUI's CLIP wrapper does."""
    chunk_length = 75

    def __init__(self, tokenizer):
        self.wrapped = SimpleNamespace(tokenizer=tokenizer)
        self.id_start, self.id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.id_pad = tokenizer.pad_token_id

    def tokenize_line(self, line):
        parsed = prompt_parser.parse_prompt_attention(line) if shared.opts.emphasis != "None" else [[line, 1.0]]
        lines, ids, weights = [], [], []  # one (ids, weights) per BREAK-separated part
        for text, weight in parsed + [["BREAK", -1]]:
            if weight == -1 and text == "BREAK":
                lines.append((ids, weights))
                ids, weights = [], []
                continue
            part = self.wrapped.tokenizer(text, add_special_tokens=False, truncation=False).input_ids
            ids, weights = ids + part, weights + [weight] * len(part)
        chunks, count = [], 0
        for ids, weights in lines:
            count += len(ids)
            for start in range(0, max(len(ids), 1), self.chunk_length):
                part, multipliers = ids[start:start + self.chunk_length], weights[start:start + self.chunk_length]
                fill = self.chunk_length - len(part)
                chunk = PromptChunk()
                chunk.tokens = [self.id_start] + part + [self.id_end] + [self.id_pad] * fill
                chunk.multipliers = [1.0] + multipliers + [1.0] * (fill + 1)
                chunks.append(chunk)
        return chunks, count

    def encode(self, text_encoder, prompts):
        """(B, 77 * chunks, C): each chunk encoded on its own, shorter prompts padded with empty chunks; each chunk
        position of the batch scaled by its multipliers, then back to the batch's mean before scaling (the WebUI's
        "Original" emphasis: a prompt's encoding depends on the prompts encoded with it); and the first chunk's
        pooled output (B, C)."""
        chunks = [self.tokenize_line(prompt)[0] for prompt in prompts]
        count = max(len(c) for c in chunks)
        empty = self.tokenize_line("")[0]
        rows = [c + empty * (count - len(c)) for c in chunks]
        ids = torch.tensor([[chunk.tokens for chunk in row] for row in rows])
        multipliers = torch.tensor([[chunk.multipliers for chunk in row] for row in rows])
        out = text_encoder(ids.flatten(0, 1))
        hidden = out.last_hidden_state.reshape(len(prompts), count, self.chunk_length + 2, -1)
        scaled = hidden * multipliers.unsqueeze(-1).to(hidden)
        means = lambda z: z.mean(dim=(0, 2, 3), keepdim=True)  # per chunk, over the batch
        scaled = scaled * (means(hidden) / means(scaled))
        pooled = out.pooler_output.reshape(len(prompts), count, -1)[:, 0]
        return scaled.reshape(len(prompts), count * (self.chunk_length + 2), -1), pooled


model_hijack = SimpleNamespace(clip=None)
