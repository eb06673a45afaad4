"""Stand-in for modules/sd_hijack.py: model_hijack.clip tokenizes prompts into 77-token chunks."""
from types import SimpleNamespace


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
        ids = self.wrapped.tokenizer(line, add_special_tokens=False, truncation=False).input_ids
        chunks = []
        for start in range(0, max(len(ids), 1), self.chunk_length):
            part = ids[start:start + self.chunk_length]
            chunk = PromptChunk()
            chunk.tokens = [self.id_start] + part + [self.id_end] + [self.id_pad] * (self.chunk_length - len(part))
            chunk.multipliers = [1.0] * len(chunk.tokens)
            chunks.append(chunk)
        return chunks, len(ids)


model_hijack = SimpleNamespace(clip=None)
