import jax
from jax_tilek import mhc
from jax_tilek.testing import OpContract

class TestExpand(OpContract):
    fn = mhc.expand_to_mhc
    rows = True
    differentiable = (0,)
