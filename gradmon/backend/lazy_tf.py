"""TensorFlow for gradmon's TensorFlow paths, imported only where Keras runs on it.

The gradient side's modules name `tf` at module level. On Keras' TensorFlow
backend `tf` is the `tensorflow` module itself (nothing changes); on JAX and
PyTorch it is a stand-in that imports TensorFlow on first use, so importing
gradmon needs no TensorFlow there, and a TensorFlow-only path reached by
mistake fails with TensorFlow's own `ModuleNotFoundError`.
"""

import importlib
import types

import keras


def is_tensorflow():
    """Whether Keras runs on TensorFlow (`keras.backend.backend()`)."""
    return keras.backend.backend() == "tensorflow"


class _OnFirstUse(types.ModuleType):
    def __getattr__(self, name):
        return getattr(importlib.import_module("tensorflow"), name)


def tensorflow():
    """`tensorflow` on Keras' TensorFlow backend, else a stand-in importing it on first use."""
    if is_tensorflow():
        return importlib.import_module("tensorflow")
    return _OnFirstUse("tensorflow")
