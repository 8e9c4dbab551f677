"""Ray side of collapse-sweep: the per-trial trainable wrapping ``vae.train``.

With ``vae/`` free of Ray imports, this package (and ``sweeps/``) are the only places
that import Ray.
"""
