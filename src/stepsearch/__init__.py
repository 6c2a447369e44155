"""stepsearch: optimized sampling schedules for diffusion models.

The core flows one way: noise schedule -> denoiser -> step schedule -> solver -> sample.
"""

from stepsearch.noise import (
    EDM,
    CosineVP,
    DiscreteVP,
    FlowMatching,
    LinearVP,
    NoiseSchedule,
    noise_schedule_from_config,
)

__version__ = "0.1.0"

__all__ = [
    "EDM",
    "CosineVP",
    "DiscreteVP",
    "FlowMatching",
    "LinearVP",
    "NoiseSchedule",
    "__version__",
    "noise_schedule_from_config",
]
