"""cryofire_ext: amortized ab initio heterogeneous reconstruction (cryoFIRE) core.

The core knows nothing of STAR or .cs column names; `integrations` adapts files
to the types defined here (`ParticleStack`, `CTFParams`, `Predictions`).
"""

__version__ = "0.1.0"

from cryofire_ext.errors import InputError  # noqa: E402

__all__ = ["InputError", "__version__"]
