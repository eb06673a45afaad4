"""Stand-in for modules/shared.py: state, opts and the loaded model."""
from types import SimpleNamespace

state = SimpleNamespace(textinfo=None, interrupted=False, skipped=False, sampling_step=0, sampling_steps=0)
opts = SimpleNamespace(skip_early_cond=0.0, s_min_uncond_all=False, emphasis="Original")
sd_model = None
cmd_opts = SimpleNamespace(api=True, nowebui=False, api_auth=None)  # launched with --api, no --api-auth
