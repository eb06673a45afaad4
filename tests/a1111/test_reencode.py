"""The WebUI's prompts re-encoded without a word (memoguard.hosts.WebUIPromptText) through the stand-in WebUI's own
emphasis parser and conditioning: the syntax survives, and leave-one-out, the default explanation, measures what the
WebUI would sample from the shorter prompt."""
import html
from types import SimpleNamespace

import pytest
import torch

from memoguard.score import raw_step_score
from memoguard.hosts import WebUIPromptText
from memoguard.mitigate import PADDED_NOTE
from modules import prompt_parser, shared
from test_script import infotext_fields, kdiffusion_start, make_p, run
from memoguard_a1111.script import panel_for

WORDS = WebUIPromptText(prompt_parser.parse_prompt_attention, str.split, encode=None)  # words split at spaces here


def weighted_words(text, parts=WORDS):
    """[(word, weight)] of a prompt as the WebUI reads it, "BREAK" where one is."""
    out = []
    for fragment, weight in prompt_parser.parse_prompt_attention(text):
        out += [("BREAK", -1)] if weight == -1 else [(w, pytest.approx(weight)) for w in parts.split(fragment)]
    return out


@pytest.mark.parametrize("text", ["a (red:1.3) house BREAK on [a hill]", "((two)) words (nested (deep:0.5):1.2)",
                                  r"a \(literal\) bracket: yes", "plain words only"])
def test_the_rebuilt_prompt_reads_as_the_original(text):
    assert weighted_words(WORDS.without(text, set())) == weighted_words(text)


def test_a_removed_word_leaves_every_other_word_its_weight_and_every_break_its_place():
    text = "a (red house:1.3) BREAK on [a hill] (far:0.7)"
    words = weighted_words(text)
    plain = [w for w in words if w[0] != "BREAK"]
    for k in range(len(plain)):
        without = weighted_words(WORDS.without(text, {k}))
        assert without == [w for w in words if w is not plain[k]]


def test_without_emphasis_a_prompt_is_rebuilt_literally():
    literal = WebUIPromptText(lambda text: [(text, 1.0)], str.split, encode=None, escape=False)
    assert literal.without("a (red:1.3) house", {2}) == "a (red:1.3)"


def gap(model, x, t, text, negative=""):
    """||eps(x, text) - eps(x, negative)|| through the model's own conditioning at the size the WebUI samples."""
    height, width = model.image_size

    def cond(prompt):
        c = model.get_learned_conditioning(prompt_parser.SdConditioning([prompt], width=width, height=height))
        return dict(c) if isinstance(c, dict) else {"c_crossattn": [c]}
    t = torch.as_tensor(t).reshape(1)
    with torch.no_grad():
        return float(raw_step_score(model.apply_model(x, t, cond(text)) - model.apply_model(x, t, cond(negative))))


# each word of PROMPT and the prompt the WebUI would get without it, written out
PROMPT = "a (red:1.3) house BREAK on a hill"
WITHOUT = {"red": "a house BREAK on a hill", "house": "a (red:1.3) BREAK on a hill", "hill": "a (red:1.3) house BREAK on a"}


@pytest.mark.parametrize("host", ["webui", "webui_xl"])
def test_leave_one_out_is_the_gap_drop_of_the_prompt_without_the_word(host, request):
    """Weights, BREAK and (SDXL) the pooled vector come from the WebUI's own encoding of the shorter prompt."""
    model = request.getfixturevalue(host)
    p = make_p(model, sampler_name="Euler", prompt=PROMPT)
    monitor, processed = run(p, explain=True)
    assert not monitor.errors
    (got,) = monitor.image_explanations(0, 0)
    assert got.method == "leave_one_out" and got.tokens == ["a", "red", "house", "on", "a", "hill"]
    x, t = kdiffusion_start(model, p)
    base = gap(model, x, t, PROMPT)
    assert got.gap_before == pytest.approx(base, rel=1e-4)
    for word, shorter in WITHOUT.items():
        assert got.scores[got.tokens.index(word)] == pytest.approx(base - gap(model, x, t, shorter), rel=1e-3, abs=1e-5)
    assert infotext_fields(processed.infotexts[0])["MemoGuard explanation"] == "leave-one-out"


def test_conditioning_that_is_not_the_prompts_text_is_explained_by_gradient_and_the_panel_says_why(webui, monkeypatch):
    encode = prompt_parser.get_multicond_learned_conditioning

    def changed_by_an_extension(model, prompts, steps):
        out = encode(model, prompts, steps)
        for composable in out.batch:
            for c in composable:
                c.schedules[0].cond = c.schedules[0].cond * 1.5
        return out
    monkeypatch.setattr(prompt_parser, "get_multicond_learned_conditioning", changed_by_an_extension)
    monitor, processed = run(make_p(webui, sampler_name="Euler"), explain=True)
    (got,) = monitor.image_explanations(0, 0)
    assert got.method == "gradient_x_delta" and not monitor.errors
    why = "not re-encoded: the sampler's conditioning is not the prompt's text encoded again"
    assert infotext_fields(processed.infotexts[0])["MemoGuard explanation"].startswith(f"gradient x input ({why}")
    assert html.escape(why) in panel_for(processed.js())


def test_emphasis_off_re_encodes_the_literal_prompt(webui, monkeypatch):
    monkeypatch.setattr(shared.opts, "emphasis", "None")
    monitor, _ = run(make_p(webui, sampler_name="Euler", prompt="a (red:1.3) house"), explain=True)
    (got,) = monitor.image_explanations(0, 0)
    assert got.method == "leave_one_out" and got.tokens == ["a", "(", "red", ":", "1", ".", "3", ")", "house"]


def test_forge_re_encodes_and_loads_its_unet_back(forge):
    from backend import memory_management
    memory_management.loaded.clear()
    monitor, _ = run(make_p(forge, sampler_name="Euler", prompt=PROMPT), explain=True)
    (got,) = monitor.image_explanations(0, 0)
    assert got.method == "leave_one_out" and not monitor.errors
    encoder = [k for k, m in enumerate(memory_management.loaded) if m is forge.text_encoder]
    # the sampling's UNet (a per-sampling clone) is loaded back after each encoding during sampling
    assert encoder and all(type(memory_management.loaded[k + 1]).__name__ == "UnetPatcher" for k in encoder[2:])


@pytest.mark.parametrize("host", ["webui", "webui_xl", "forge_xl"])
def test_token_removal_samples_the_prompt_without_the_words_it_records(host, request):
    """The sampler's first step is the WebUI's own encoding (SDXL: its pooled vector too) of the prompt without the
    words the infotext names."""
    model = request.getfixturevalue(host)
    prompt = "a red house on the hill"  # every word once: the shorter prompt follows from the removed words
    p = make_p(model, sampler_name="Euler", prompt=prompt)
    monitor, processed = run(p, mitigation="always", strategy="remove_tokens")
    assert not monitor.errors
    record = monitor.results[0].mitigation
    (removed,) = record.removed
    assert record.ran and removed and record.after[0] < record.before[0]
    assert infotext_fields(processed.infotexts[0])["MemoGuard mitigation"] == \
        f"always removed {' '.join(removed)} {record.before[0]:.4f} -> {record.after[0]:.4f}"
    shorter = " ".join(w for w in prompt.split() if w not in removed)
    x, t = kdiffusion_start(model, p)
    elements = x[0].numel()
    first_step = float(monitor.results[0].trace.per_step()[0, 0])
    assert first_step == pytest.approx(gap(reference(model), x, t, shorter) / elements ** 0.5, rel=1e-3)
    assert first_step == pytest.approx(record.after[0], rel=1e-3)


def reference(model):
    """The model whose apply_model takes A1111's conditioning (Forge's SDXL stand-in wraps the A1111 one)."""
    return getattr(model, "xl", model)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """CLIP's real BPE (the bundled model's): its slow tokenizer keeps the word pattern as `pat`, as the WebUI's does."""
    from transformers import CLIPTokenizer
    from memoguard.resources import asset_path
    return CLIPTokenizer.from_pretrained(asset_path("tiny-sd", "tokenizer"))


class _Embeddings:
    """A textual-inversion database as the WebUI's chunker consults it: names matched on token ids."""

    def __init__(self, tokenize, **vectors):
        self.named = {tuple(tokenize([name])[0]): SimpleNamespace(name=name, vectors=n) for name, n in vectors.items()}

    def find_embedding_at_position(self, ids, position):
        for key, embedding in sorted(self.named.items(), key=lambda kv: -len(kv[0])):
            if tuple(ids[position:position + len(key)]) == key:
                return embedding, len(key)
        return None, None


def test_a_textual_inversion_name_is_one_word_however_clip_splits_it(tiny_tokenizer):
    from memoguard_a1111.host_model import split_words
    tokenize = lambda words: tiny_tokenizer(words, add_special_tokens=False).input_ids
    chunker = SimpleNamespace(tokenize=tokenize, hijack=SimpleNamespace(
        embedding_db=_Embeddings(tokenize, mgvec3=3, **{"ng_deep_v1": 2})))
    split = split_words(tiny_tokenizer, chunker)
    assert split_words(tiny_tokenizer)("a mgvec3 house") == ["a", "mgvec", "3", "house"]  # CLIP's own split
    assert split("a mgvec3 house, ng_deep_v1") == ["a", "mgvec3", "house", ",", "ng_deep_v1"]
    assert split("a mgvec house") == ["a", "mgvec", "house"]  # a part of a name is not the name
    text = WebUIPromptText(prompt_parser.parse_prompt_attention, split, encode=None)
    assert text.without("a (mgvec3 house:1.2)", {1}) == "a (house:1.2)"


def test_an_embeddings_vectors_are_one_word_shown_by_its_name():
    from memoguard_a1111.host_model import embedding_words
    from memoguard.model import word_numbers
    fix = SimpleNamespace(name="mgvec3", vectors=3)
    chunks = [SimpleNamespace(tokens=[0] * 8, fixes=[(1, fix)]), SimpleNamespace(tokens=[0] * 8, fixes=[(0, fix)])]
    raw = ["<bos>", "a</w>", "!", "!", "!", "house</w>", "<eos>", "<eos>",
           "<bos>", "!", "!", "!", "hill</w>", "<eos>", "<eos>", "<eos>"]
    names, ends = embedding_words(chunks, raw)
    assert names[1:6] == ["a", "mgvec3", "", "", "house"] and names[9:13] == ["mgvec3", "", "", "hill"]
    in_prompt = [n not in ("<bos>", "<eos>") for n in names]
    numbers = word_numbers(ends, in_prompt)
    assert numbers[1:6] == [0, 1, 1, 1, 2] and numbers[9:13] == [3, 3, 3, 4]


def distinct_words(tokenizer, n):
    """n distinct lowercase words that CLIP's BPE keeps as one token each (no comma: the chunks break at 75)."""
    words = [t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>") and t[:-4].isalpha() and t[:-4].islower()
             and 3 <= len(t) - 4 <= 6]
    return sorted(words)[:n]


@pytest.mark.parametrize("tokens, padded", [(76, False), (151, True)])
def test_token_removal_across_a_chunk_samples_the_prompt_typed_without_the_words(webui, tokens, padded):
    """A prompt that loses a 77-token chunk with its removed words: repeated whole it is the prompt typed alone
    (76 -> 75 tokens: two chunks become one, attention over [c, c] is attention over c); where its length does not
    divide the prompt's (151 -> 150 tokens: three chunks become two) it is padded with the empty chunk, as a batch
    pads, and the infotext says so."""
    words = distinct_words(webui.diffusers_model.tokenizers[0], tokens)
    prompt = " ".join(words)
    p = make_p(webui, sampler_name="Euler", prompt=prompt)
    monitor, processed = run(p, mitigation="always", strategy="remove_tokens")
    assert not monitor.errors
    record = monitor.results[0].mitigation
    (removed,) = record.removed
    assert record.ran and removed and record.padded == [padded]
    note = f" ({PADDED_NOTE})" if padded else ""
    assert infotext_fields(processed.infotexts[0])["MemoGuard mitigation"] == \
        f"always removed {' '.join(removed)} {record.before[0]:.4f} -> {record.after[0]:.4f}{note}"
    x, t = kdiffusion_start(webui, p)
    typed_alone = gap(webui, x, t, " ".join(w for w in words if w not in removed)) / x[0].numel() ** 0.5
    first_step = float(monitor.results[0].trace.per_step()[0, 0])
    assert first_step == pytest.approx(record.after[0], rel=1e-3)
    assert (first_step == pytest.approx(typed_alone, rel=1e-3)) != padded
