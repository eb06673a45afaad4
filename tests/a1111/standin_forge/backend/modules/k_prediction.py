"""Stand-in for backend/modules/k_prediction.py: an epsilon model's sigma schedule (x = x0 + sigma * eps)."""
import torch


class Prediction(torch.nn.Module):
    prediction_type = "epsilon"  # Forge: 'epsilon' | 'v_prediction' | 'edm' | 'const' (rectified flow)

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod).sqrt())
        self.register_buffer("log_sigmas", self.sigmas.log())

    def timestep(self, sigma):
        """Fractional timestep by linear interpolation in log sigma."""
        log_sigma = sigma.log()
        idx = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo, hi = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        return (idx - 1) + (log_sigma - lo) / (hi - lo)

    def calculate_input(self, sigma, noise):
        return noise / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.view(-1, 1, 1, 1)
