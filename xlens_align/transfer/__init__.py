"""Carry what was found in model A over to model B through a map: steering vectors, probes and
a logit lens across tokenizers.

* `vectors`: `steering_vector` (difference of means at a point), `transfer_direction` (exact for
  linear maps, the mean of ``map(x + v) - map(x)`` otherwise; rescaled to B's typical norm with
  ``norms=``), `steer` (adds ``alpha * v`` to a stream, on `patching.patch`);
* `probes`: `fit_probe` (logistic regression), `transfer_probe` (``"pinv"``: A's probe read
  through the map's pseudo-inverse; ``"refit"``: refit on mapped rows of A), `probe_accuracy`;
* `measure`: `steering_effects` (change of log-odds between two target tokens and of CE on
  neutral text, per vector, bootstrap intervals, fraction of a reference vector's effect);
* `lens`: `cross_lens` (A's state read by B's unembedding through a map into B's ``final``,
  beside A's own logit lens);
* `templates`: small labelled text sets written in the repository.

>>> v = xa.transfer.steering_vector(a, pos, neg, "resid_post.19")
>>> w = xa.transfer.transfer_direction(m, v, norms=(s_a, s_b))
>>> with xa.transfer.steer(b, "resid_post.6", w, alpha=4.0): ...
"""

from . import templates
from .lens import LensView, cross_lens, cross_logits, lens_logits, own_lens, unembed
from .measure import SteeringTable, log_odds, next_token_ce, steering_effects, target_ids
from .probes import TRANSFER_METHODS, Probe, ProbeTable, fit_probe, probe_accuracy, transfer_probe
from .vectors import (
    REDUCTIONS,
    activation_norm,
    pooled,
    steer,
    steering_vector,
    transfer_direction,
)

__all__ = [
    "REDUCTIONS",
    "TRANSFER_METHODS",
    "LensView",
    "Probe",
    "ProbeTable",
    "SteeringTable",
    "activation_norm",
    "cross_lens",
    "cross_logits",
    "fit_probe",
    "lens_logits",
    "log_odds",
    "next_token_ce",
    "own_lens",
    "pooled",
    "probe_accuracy",
    "steer",
    "steering_effects",
    "steering_vector",
    "target_ids",
    "templates",
    "transfer_direction",
    "transfer_probe",
    "unembed",
]
