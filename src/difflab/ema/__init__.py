"""Post-hoc EMA (EDM2): power-function profiles tracked during training (``ema=posthoc``) and snapshotted, then any
EMA length reconstructed after it: ``python -m difflab.ema reconstruct RUN_DIR sigma_rel=0.07``."""

from difflab.ema.power import beta, combination, fit_error, gamma_of, sigma_rel_of
from difflab.ema.snapshots import Reconstruction, reconstruct, snapshots, write_snapshot

__all__ = ["Reconstruction", "beta", "combination", "fit_error", "gamma_of", "reconstruct", "sigma_rel_of",
           "snapshots", "write_snapshot"]
