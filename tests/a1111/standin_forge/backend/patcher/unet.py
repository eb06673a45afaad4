"""Stand-in for backend/patcher/unet.py: UnetPatcher (model, model_options, clone, post-CFG functions)."""
import copy


class UnetPatcher:
    def __init__(self, model):
        self.model = model              # KModel
        self.model_options = {"transformer_options": {}}
        self.controlnet_linked_list = None
        self.extra_concat_condition = None

    def clone(self):
        n = UnetPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)  # as Forge: a bound method's object would be copied
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_concat_condition = self.extra_concat_condition
        return n

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = \
            self.model_options.get("sampler_post_cfg_function", []) + [post_cfg_function]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True
