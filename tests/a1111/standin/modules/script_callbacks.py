"""Stand-in for modules/script_callbacks.py: the CFG callback params (same fields) and registry."""
import sys
import traceback
from collections import defaultdict


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x, self.sampling_step, self.total_sampling_steps, self.inner_model = x, sampling_step, total_sampling_steps, inner_model


callback_map = defaultdict(list)
reported = []  # what the WebUI would print for exceptions raised inside callbacks


def on_cfg_denoiser(callback):
    callback_map["cfg_denoiser"].append(callback)


def on_cfg_denoised(callback):
    callback_map["cfg_denoised"].append(callback)


def on_app_started(callback):
    callback_map["app_started"].append(callback)


def app_started_callback(demo, app):
    _run("app_started", (demo, app))


def remove_callbacks_for_function(callback):
    for callbacks in callback_map.values():
        callbacks[:] = [c for c in callbacks if c != callback]


def _run(kind, params):
    for callback in list(callback_map[kind]):
        try:
            callback(*params) if kind == "app_started" else callback(params)
        except Exception:  # the WebUI reports and goes on
            reported.append(traceback.format_exc())
            print(reported[-1], file=sys.stderr)


def cfg_denoiser_callback(params):
    _run("cfg_denoiser", params)


def cfg_denoised_callback(params):
    _run("cfg_denoised", params)
