"""The jobs: each eenn app as one function from its config to its run dir (train, fit, infer,
compare, pipeline). They own Hydra's configs, wandb, paths and printing; the packages they call
(models, policies, inference, evaluation) take tensors and dataclasses."""
