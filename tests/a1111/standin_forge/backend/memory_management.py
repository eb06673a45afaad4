"""Stand-in for backend/memory_management.py: which models were loaded to the GPU, in order."""
loaded = []


def load_model_gpu(model):
    loaded.append(model)
