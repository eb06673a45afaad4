"""Tiny random-weight diffusers pipelines of today's flow-matching families (SD3, Flux schnell / dev, Chroma,
Qwen-Image), built offline from diffusers' and transformers' own classes: CLIP's BPE files of the bundled model, a T5
sentencepiece tokenizer and a byte-level BPE with Qwen's chat tokens trained here on a few hundred ordinary captions. Weights are drawn from a normal distribution (no all-zero layer: the
output depends on the prompt), saved as a pipeline folder `memoguard.standalone` loads like a downloaded one."""
from pathlib import Path

import torch

from memoguard.resources import asset_path

CLIP_TOKENIZER = asset_path("tiny-sd", "tokenizer")
FAMILIES = ("sd3", "flux", "flux-dev", "chroma", "qwen-image")
WORDS = ("a an the photo painting of portrait cat dog red blue green old young man woman house tree river city "
         "mountain at night in on with by under sunset street boat car garden window and beside small large bright "
         "dark forest beach flowers table chair bird horse sky clouds snow rain winter summer").split()


def captions(n: int = 400, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(WORDS), (n, 6), generator=g).tolist()
    return [" ".join(WORDS[i] for i in row) + ("," if k % 3 == 0 else "") + " " + WORDS[row[0]]
            for k, row in enumerate(picks)]


def t5_tokenizer():
    """A sentencepiece-style (Unigram, "▁" word starts) tokenizer with T5's special tokens: pad 0, </s> 1, unk 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(captions() + [",.!?;:"], trainers.UnigramTrainer(
        vocab_size=160, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def qwen_tokenizer(template: str):
    """A byte-level BPE (GPT-2 / Qwen style: a word's first piece carries its space) with Qwen's chat tokens, trained on
    the captions and the pipeline's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(captions() + [template.format("")] * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def _qwen_image(seed: int):
    """A QwenImagePipeline: a 2-layer Qwen2.5-VL (a 1-block vision tower it never uses), a 2-block DiT, the video VAE
    at two levels."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    template = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                 transformer=None).prompt_template_encode  # the pipeline's own chat template
    tokenizer = qwen_tokenizer(template)
    special = dict(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **special),
        vision_config=dict(depth=1, hidden_size=32, out_hidden_size=64, num_heads=2, intermediate_size=64,
                           fullatt_block_indexes=[0]), **special))
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                              axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")
    _normal_init(transformer, text_encoder, vae, seed=seed)
    _widen(transformer, attn=5, _mod=5)
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


def _normal_init(*modules, seed: int):
    """Every parameter drawn from N(0, 0.02), norms' scales from 1 + N(0, 0.02), token embeddings ten times wider (the
    prompt must move the prediction): zero-initialised output layers and modulations (the DiT default) would make
    the prediction ignore the prompt."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for name, p in m.named_parameters():
                noise = torch.randn(p.shape, generator=g) * 0.02
                norm = "norm" in name and name.endswith("weight")
                p.copy_(1 + noise if norm else noise * (10 if "embed" in name else 1))


def _widen(transformer, **factors):
    """Chroma's and Qwen-Image's text reaches the image through attention alone, gated by time modulations (no pooled
    text): at N(0, 0.02) the prompt moves the prediction by 1e-5 (Chroma) to 1e-3 (Qwen-Image) of its size. Parameters
    whose name holds a key of `factors` (norms excepted) are made that much wider, so that it is a few percent."""
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            factor = next((f for key, f in factors.items() if key in name), 1)
            if "norm" not in name:
                p.mul_(factor)


def build_flow_pipeline(folder: Path, family: str, seed: int = 0) -> Path:
    """A diffusers pipeline folder of `family` (FAMILIES) with tiny random weights; returns the folder."""
    from diffusers import (AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler,
                           FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                              T5EncoderModel)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    torch.manual_seed(seed)
    if family == "qwen-image":
        _qwen_image(seed).save_pretrained(folder)
        return folder
    clip = lambda hidden, cls: cls(CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
                                                  num_hidden_layers=2, num_attention_heads=4, projection_dim=hidden,
                                                  max_position_embeddings=77, pad_token_id=49407,
                                                  bos_token_id=49406, eos_token_id=49407, hidden_act="gelu"))
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER)
    t5_tok = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, scaling_factor=1.5, shift_factor=0.1)
    if family == "sd3":
        clip_l, clip_g = clip(32, CLIPTextModelWithProjection), clip(48, CLIPTextModelWithProjection)
        transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                            caption_projection_dim=32, pooled_projection_dim=80, out_channels=16,
                                            pos_embed_max_size=32)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        modules = (transformer, clip_l, clip_g, t5, vae)
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip_l,
                                        tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=tokenizer,
                                        text_encoder_3=t5, tokenizer_3=t5_tok)
    elif family == "chroma":  # Flux's layout, T5 alone, no embedded guidance
        transformer = ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                               axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
                                               approximator_hidden_dim=32, approximator_layers=1)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        modules = (transformer, t5, vae)
        pipe = ChromaPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=t5, tokenizer=t5_tok)
    else:
        clip_l = clip(32, CLIPTextModel)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                             pooled_projection_dim=32, guidance_embeds=family == "flux-dev",
                                             axes_dims_rope=(4, 6, 6))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        modules = (transformer, clip_l, t5, vae)
        pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip_l,
                            tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tok)
    _normal_init(*modules, seed=seed)
    if family == "chroma":
        _widen(transformer, attn=5, distilled_guidance_layer=10)
    pipe.save_pretrained(folder)
    return folder
