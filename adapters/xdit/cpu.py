"""Running diffusers' ring attention on CPU (tests, tiny examples, benchmarks); defined in
:mod:`adapters.hooks.diffusers_cp`."""

from ..hooks.diffusers_cp import lse_attention_on_cpu, math_attention

__all__ = ["lse_attention_on_cpu", "math_attention"]
