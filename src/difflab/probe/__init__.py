"""Probes: what a trained network does with t and with its condition, measured on its own inputs.

    from difflab import probe
    pipe = difflab.load("outputs/.../last.ckpt"); batch = probe.real_batch(pipe_or_config, n=16)
    probe.t_response(pipe, batch).figure()         # per-ResBlock sensitivity of activations to t
    probe.guidance_gap(pipe, batch)                # ||f(x_t, c) - f(x_t, null)|| against t
    probe.cross_attention(pipe, ["a handwritten 7"])   # attention maps per prompt token
    probe.bayes_gap(pipe, mixture)                 # data=gmm: loss over the Bayes-optimal loss per range of t

Also ``python -m difflab.probe ckpt=... probe=NAME`` and the ``callbacks=probes`` training callback.
"""

from difflab.probe.bayes_gap import BayesGap, bayes_gap, mixture_of
from difflab.probe.common import real_batch, timestep_grid
from difflab.probe.cross_attention import CrossAttentionMaps, cross_attention
from difflab.probe.guidance_gap import GuidanceGap, guidance_gap
from difflab.probe.t_response import TResponse, t_response

PROBES = ("t_response", "cfg_gap", "cross_attention", "bayes_gap")  # the names the CLI and the callback take

__all__ = ["PROBES", "BayesGap", "CrossAttentionMaps", "GuidanceGap", "TResponse", "bayes_gap", "cross_attention",
           "guidance_gap", "mixture_of", "real_batch", "t_response", "timestep_grid"]
