"""Write an offline Hugging Face cache entry for openai/clip-vit-large-patch14: tokenizer + config only.

    python tests/hosts/make_clip_hf_cache.py HF_HOME

The WebUIs (A1111 with --do-not-download-clip) build the SD1.x text encoder from this config and the
checkpoint's weights, and tokenize with this tokenizer; no weights are needed. The tokenizer files are
the repository's own copy of CLIP's BPE (memoguard/assets/tiny-sd/tokenizer); the config is CLIP
ViT-L/14's published architecture. Run it with a python that has transformers (the WebUI venv).
Use with HF_HOME=<HF_HOME> HF_HUB_OFFLINE=1.
"""
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "memoguard" / "assets" / "tiny-sd" / "tokenizer"
MODEL = "openai/clip-vit-large-patch14"
SNAPSHOT = "0000000000000000000000000000000000000000"  # any name; refs/main points to it

TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)


def main(hf_home: Path):
    repo = hf_home / "hub" / ("models--" + MODEL.replace("/", "--"))
    snap = repo / "snapshots" / SNAPSHOT
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / name, snap / name)
    from transformers import CLIPConfig
    config = CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=768)
    config._name_or_path = MODEL
    config.to_json_file(snap / "config.json")
    # check: both load offline from the cache
    import os
    os.environ["HF_HOME"], os.environ["HF_HUB_OFFLINE"] = str(hf_home), "1"
    from transformers import CLIPTextConfig, CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(snap)
    ids = tok("a red house on a hill")["input_ids"]
    assert ids[0] == 49406 and ids[-1] == 49407, ids
    assert CLIPTextConfig.from_pretrained(snap).hidden_size == 768
    print(f"{snap}: {sorted(p.name for p in snap.iterdir())}; 'a red house on a hill' -> {ids}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
