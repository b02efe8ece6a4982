"""One small model per layer kind of fastgrad, for the tests that carry
models to other engines and formats (test_export, test_keras_format): each
layer with parameters other than its defaults, trained a little. The kinds
come from the layer registry, so that a new layer without a case fails
``test_every_registered_layer_has_a_case``."""
import numpy as np

import fastgrad as fg

L = fg.layers
LAYER_KINDS = sorted(set(L.REGISTRY.classes) - {"InputLayer"})   # not in model.layers


def around(*layers):
    """layers between a Dense input layer and a Dense output layer."""
    return [L.Dense(8, input_dim=6), *layers, L.Dense(4)]


# one case per layer kind: layers with parameters other than their defaults,
# made fresh for each model (rng for parameters given as numbers)
LAYER_CASES = {
    "Dense": lambda rng: [L.Dense(8, activation="tanh", use_bias=False, input_dim=6),
                          L.Dense(5, activation="relu"), L.Dense(4)],
    "Activation": lambda rng: around(L.Activation("mish"), L.Dense(6), L.Activation("selu")),
    "BatchNormalization": lambda rng: around(
        L.BatchNormalization(epsilon=0.05, momentum=0.5), L.Dense(6),
        L.BatchNormalization(center=False, scale=False, momentum=0.5)),
    "LayerNormalization": lambda rng: around(
        L.LayerNormalization(epsilon=0.05), L.Dense(6), L.LayerNormalization(center=False),
        L.Dense(5), L.LayerNormalization(scale=False, epsilon=1e-5)),
    # threshold 0.5, cap 1.5: the test checks that inputs fall in all three parts
    "ReLU": lambda rng: around(L.ReLU(max_value=1.5, negative_slope=0.3, threshold=0.5),
                               L.Dense(8), L.ReLU(), L.Dense(8), L.ReLU(max_value=2.0),
                               L.Dense(8), L.ReLU(negative_slope=0.1, threshold=0.2)),
    "PReLU": lambda rng: around(L.PReLU(alpha_initializer=fg.initializers.RandomUniform(
        -0.5, 1.5))),
    "LeakyReLU": lambda rng: around(L.LeakyReLU(0.15)),
    "ELU": lambda rng: around(L.ELU(0.6)),
    "Softmax": lambda rng: around(L.Softmax()),
    "Dropout": lambda rng: around(L.Dropout(0.5)),
    "GaussianNoise": lambda rng: around(L.GaussianNoise(0.5)),
    "GaussianDropout": lambda rng: around(L.GaussianDropout(0.3)),
    "AlphaDropout": lambda rng: around(L.AlphaDropout(0.2)),
    "Identity": lambda rng: around(L.Identity()),
    # a first Flatten takes (batch, 2, 3); a later one is the identity
    "Flatten": lambda rng: [L.Flatten(input_shape=(2, 3)), L.Dense(8, activation="relu"),
                            L.Flatten(), L.Dense(4)],
    "Rescaling": lambda rng: around(L.Rescaling(0.37, offset=-1.5), L.Dense(6),
                                    L.Rescaling(-2.0)),
    # the first adapted by the test; two variances below the floor 1e-7 ** 2
    "Normalization": lambda rng: [
        L.Normalization(input_dim=6), L.Dense(8),
        L.Normalization(invert=True, mean=rng.normal(size=8),
                        variance=[0.0, 1e-16, *rng.uniform(0.1, 4.0, 6)]),
        L.Dense(4)],
}


def layer_model(kind, dtype, seed=0):
    """The case's model, adapted and trained a little (moving statistics,
    gammas and slopes away from their initial values), and test rows."""
    rng = np.random.default_rng(seed)
    m = fg.Sequential(LAYER_CASES[kind](rng), dtype=dtype, seed=seed)
    first = m.layers[0]
    sample = first.sample_shape if first.kind == "Flatten" else (6,)
    x = rng.standard_normal((64, *sample)) * 2
    for layer in m.layers:
        if layer.kind == "Normalization" and not layer.invert:
            layer.adapt(x * 3 + 1)
    m.compile(fg.optimizers.Adam(1e-2), "mse")
    m.fit(x, rng.standard_normal((64, 4)), epochs=2, batch_size=16, verbose=0)
    return m, rng.standard_normal((33, *sample)) * 3
