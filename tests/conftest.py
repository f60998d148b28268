import jax


# The solver tests check reversibility to ~1e-12 and convergence orders down to
# ~1e-12 errors, both of which need double precision.
jax.config.update("jax_enable_x64", True)
