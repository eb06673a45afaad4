"""The standalone path: diffusers models and single-file checkpoints as a `memoguard.DiffusionModel`, and the
batched jobs (scores, guided generation) the CLI runs on them. Needs the `standalone` extra (diffusers,
transformers); the host adapters never import it."""
