import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # deterministic CPU kernels for exact comparisons


import pytest


@pytest.fixture
def hvp_counter(monkeypatch):
    """`(built, applied)`: every HVP operator built and every product applied while the test runs."""
    from gradmon import hessian

    built, applied = [], []
    init, apply = hessian.HessianVectorProduct.__init__, hessian.HessianVectorProduct.apply

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)

    def counting_apply(self, vector):
        applied.append(1)
        return apply(self, vector)

    monkeypatch.setattr(hessian.HessianVectorProduct, "__init__", counting_init)
    monkeypatch.setattr(hessian.HessianVectorProduct, "apply", counting_apply)
    return built, applied
