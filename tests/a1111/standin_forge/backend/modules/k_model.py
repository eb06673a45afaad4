"""Stand-in for backend/modules/k_model.py: KModel.apply_model(x, sigma, c_crossattn=..., y=...) -> denoised x0.
Extra keywords go on to the UNet: SDXL's y, here the diffusers UNet's class_labels."""
import torch


class KModel(torch.nn.Module):
    def __init__(self, diffusion_model, predictor):
        super().__init__()
        self.diffusion_model, self.predictor = diffusion_model, predictor

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = self.predictor.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        out = self.diffusion_model(xc, self.predictor.timestep(t).float(), encoder_hidden_states=c_crossattn,
                                   class_labels=kwargs.get("y")).sample
        h = out.float().clone()
        h += torch.nn.functional.layer_norm(h, h.shape[1:]) * 0  # Forge's UNet adds residuals in place: n = norm(x); x += n
        return self.predictor.calculate_denoised(sigma, h, x)
