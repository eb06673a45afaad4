"""Stand-in for backend/text_processing/classic_engine.py: the prompt chunker, its CLIP tokenizer as `tokenizer`."""
from modules.sd_hijack import ChunkingTokenizer


class ClassicTextProcessingEngine:
    def __init__(self, tokenizer):
        self._chunker = ChunkingTokenizer(tokenizer)  # same 77-token chunks as the WebUI's
        self.tokenizer = tokenizer
        self.id_start, self.id_end, self.id_pad = self._chunker.id_start, self._chunker.id_end, self._chunker.id_pad

    def tokenize_line(self, line):
        return self._chunker.tokenize_line(line)

    def encode(self, text_encoder, prompts):
        return self._chunker.encode(text_encoder, prompts)
