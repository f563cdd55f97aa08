"""Single-process tests: model, kernels, data, configs and the CLIs (run in-process or, marked slow, as
subprocesses)."""
