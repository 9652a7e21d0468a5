"""The DiD sampler: draft small blocks with an exact KV cache, then refine by snapshot confidence."""

from did_engine.sampling.sampler import DiDSampler, GenerationResult, RefineStage, SamplerConfig, generate  # noqa: F401
