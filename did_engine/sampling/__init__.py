"""The DiD sampler: draft small blocks with an exact KV cache, then refine by snapshot confidence.

    config.py    SamplerConfig, RefineStage, GenerationResult (checked settings, the result)
    drawing.py   drawing tokens (SUBS, temperature, nucleus, float64 race), choosing positions
    sampler.py   DiDSampler and generate: the draft and the refinement stages
"""

from did_engine.sampling.config import GenerationResult, RefineStage, SamplerConfig  # noqa: F401
from did_engine.sampling.sampler import DiDSampler, generate  # noqa: F401
