"""Per-layer curvature: the top eigenvalue of each layer's diagonal Hessian block.

For each layer `L` it computes the largest algebraic eigenvalue of `H_LL`,
the diagonal block of the Hessian of the probe loss (`gradmon.hessian`'s
loss: compiled loss plus `model.losses`, `training=False`) for `L`'s
trainable variables, all of them together (kernel and bias span one block),
with its residual `||H_LL v - lambda v||`. Layers are the groups of the
observer's `grouping="layer"` (`gradmon.tags.group_names`), so the names
match the per-layer gradient tags.

Each layer has its own HVP operator, the diagonal block for its variables.
The layers are cut into `LAYER_SEGMENTS` runs of consecutive layers; each
run has one compiled HVP that watches the run's variables only, and a
layer's product is that HVP of its vector embedded in the run's (zeros
elsewhere), read back at the layer's entries. Both backward passes stop at
the run's first layer: cheaper than a full HVP, the more so the nearer the
run is to the output (on MobileNetV2 a block HVP stopping at the last layer
took 0.34x a full HVP's time, at the first 0.78x). A model is traced
`LAYER_SEGMENTS` times whatever its number of layers (one trace per layer
was ~75 s at the first per-layer probe of MobileNetV2), cached like the
full operator's. On PyTorch, which compiles nothing, each layer's HVP
stops at the layer itself. The eigenvalues come from `hessian.spectrum`
(thick-restart Lanczos) on each operator.

By Cauchy's interlacing theorem `lambda_1(H_LL) <= lambda_1(H)`: the layer
whose block comes closest to the sharpness is where the curvature sits.
"""

import numpy as np

from gradmon import tags
from gradmon import hessian
from gradmon.backend import hvp as _backend
from gradmon.hessian.operator import HessianVectorProduct, _check_model
from gradmon._validation import check_bool, invalid


def layer_variables(model):
    """The model's trainable variables grouped by layer, as the observer groups them.

    Args:
        model: a built Keras model.

    Returns:
        A dict `{layer name: [variables]}` in the order of
        `model.trainable_variables`; names are those of the per-layer
        gradient tags (`gradmon.tags.group_names(..., "layer")`).
    """
    variables = list(model.trainable_variables)
    names, ids = tags.group_names(variables, "layer")
    groups = {name: [] for name in names}
    for v, i in zip(variables, ids):
        groups[names[i]].append(v)
    return groups


def layer_operators(model, data, layers=None, hvp_mode=None):
    """Builds one block Hessian-vector product operator per layer.

    Args:
        model: a compiled Keras model (built here from the probe data if it
            is not yet).
        data: the probe: a batch, a list of batches, a finite
            `tf.data.Dataset` or a `hessian.ProbeData` (see
            `hessian.make_hvp`); converted once and shared by the operators.
        layers: names of the layers to include (see `layer_variables`).
            Defaults to `None`: every layer with trainable variables.
        hvp_mode: see `hessian.make_hvp`. Defaults to `None`.

    Returns:
        A dict `{layer name: hessian.HessianVectorProduct}`, in layer order;
        each operator is the layer's diagonal block of the Hessian. Pass it
        as `model` to `layer_spectrum` to reuse it across probes.
    """
    return _operators(model, data, layers, hvp_mode, "layers")


def _operators(model, data, layers, hvp_mode, argument):
    """`layer_operators`, a bad layer name reported as `argument`."""
    _check_model(model)
    probe = hessian.prepare_data(data)
    if not model.built:
        model(probe.batches[0][0], training=False)  # creates the weights, nothing else
    groups = layer_variables(model)
    if not groups:
        raise invalid("model", "a model with trainable variables", getattr(model, "name", model))
    if layers is not None:
        names = list(layers) if isinstance(layers, (list, tuple)) else None
        if not names or any(not isinstance(n, str) or n not in groups for n in names):
            raise invalid(argument, f"a non-empty list of layer names among {list(groups)}", layers)
        groups = {name: v for name, v in groups.items() if name in names}
    operators, first = {}, None
    for segment in _segments(list(groups)):
        within = [v for name in segment for v in groups[name]] if len(segment) > 1 else None
        for name in segment:
            operators[name] = first = HessianVectorProduct(
                model, probe, hvp_mode=hvp_mode, variables=groups[name], _within=within, _sibling=first)
    return operators


# Layers share a compiled block HVP in this many segments of consecutive
# layers (where the backend compiles: TensorFlow, JAX). MobileNetV2
# (weights=None, 96x96, 104 layers), first per-layer probe: ~75 s of tracing
# with one function per layer.
LAYER_SEGMENTS = 4


def _segments(names):
    """`names` (in model order) in at most `LAYER_SEGMENTS` runs of
    consecutive layers, as even as can be; one run per layer where the
    backend does not compile (PyTorch: a wider block would only cost)."""
    if not _backend.current().COMPILED:
        return [[name] for name in names]
    count = min(LAYER_SEGMENTS, len(names))
    bounds = np.linspace(0, len(names), count + 1).round().astype(int)
    return [names[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def check_per_layer(value):
    """`HessianMonitor(per_layer=)`: `True`/`False`, or a tuple of layer names (checked on the model later)."""
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(name, str) for name in value):
            raise invalid("per_layer", "True, False or a non-empty list of layer names", value)
        return tuple(value)
    return check_bool("per_layer", value)


def layer_spectrum(model, data=None, layers=None, top_k=1, tol=1e-4, max_hvps=None, init_vectors=None,
                   seed=None, hvp_mode=None):
    """Computes the largest eigenvalue(s) of each layer's diagonal Hessian block.

    Args:
        model: a compiled Keras model, or the dict returned by
            `layer_operators` (then `data`, `layers` and `hvp_mode` must be
            `None`).
        data: the probe (see `layer_operators`). Defaults to `None` (only
            with operators).
        layers: names of the layers to include. Defaults to `None`: all.
        top_k: largest eigenvalues per layer (at most the layer's number of
            parameters). Defaults to `1`.
        tol: residual tolerance relative to `||H_LL||`, in (0, 1) (see
            `hessian.spectrum`). Defaults to `1e-4`.
        max_hvps: HVP budget per layer. Defaults to `None` (see
            `hessian.spectrum`).
        init_vectors: warm starts, a dict `{layer name: previous Spectrum or
            its eigenvectors}`; layers without an entry start at random.
            Defaults to `None`.
        seed: seed of each layer's random start. Defaults to `None`.
        hvp_mode: see `hessian.make_hvp`. Defaults to `None`.

    Returns:
        A dict `{layer name: hessian.Spectrum}` in layer order; each
        spectrum's eigenvectors are flat over that layer's variables (in
        model order), and its `hvp_count` counts that layer's block HVPs.

    References:
        Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian: Neural
        Networks Through the Lens of the Hessian", IEEE BigData 2020 (block
        spectra per layer).
        C. Lanczos, J. Res. Nat. Bur. Standards 45 (1950); K. Wu and H.
        Simon, SIAM J. Matrix Anal. Appl. 22(2), 2000 (see
        `hessian.spectrum`).

    Example:

    ```python
    per_layer = gradmon.layer_curvature.layer_spectrum(model, (x, y), seed=0)
    sharpest = max(per_layer, key=lambda name: per_layer[name].eigenvalues[0])
    ```
    """
    if isinstance(model, dict):
        for argument, value in (("data", data), ("layers", layers), ("hvp_mode", hvp_mode)):
            if value is not None:
                raise invalid(argument, "None when `model` is the dict of `layer_operators` (it holds them)",
                              value)
        if not model or not all(isinstance(op, hessian.HessianVectorProduct) for op in model.values()):
            raise invalid("model", "a compiled Keras model or the dict returned by `layer_operators`",
                          type(model).__name__)
        operators = model
    else:
        if data is None:
            raise invalid("data", "a batch, a list of batches or a dataset", data)
        operators = layer_operators(model, data, layers=layers, hvp_mode=hvp_mode)
    if init_vectors is not None and not isinstance(init_vectors, dict):
        raise invalid("init_vectors", "None or a dict {layer name: Spectrum or eigenvectors}",
                      type(init_vectors).__name__)
    init_vectors = init_vectors or {}
    return {name: hessian.spectrum(op, top_k=top_k, tol=tol, max_hvps=max_hvps,
                                   init_vectors=init_vectors.get(name), seed=seed)
            for name, op in operators.items()}
