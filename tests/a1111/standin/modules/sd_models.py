"""Stand-in for modules.sd_models: the checkpoint is loaded eagerly here (Forge's forge_model_reload is absent)."""
