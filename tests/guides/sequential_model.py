"""The Sequential model, after the keras.io guide of that name.

Left out: layers called on their own (``layer(x)``; fastgrad's layers
compute inside a model), convolutional layers (the guide's debugging
workflow uses Dense layers here), and feature extraction and transfer
learning through the functional API (``keras.Model(inputs=...,
outputs=...)``). Freezing layers for fine-tuning is kept.
"""
import numpy as np

import keras
from keras import layers

results = {}


def weight_shapes(model):
    return [list(w.shape) for w in model.weights]


# -- When to use a Sequential model -------------------------------------------
# Define Sequential model with 3 layers
model = keras.Sequential(
    [
        layers.Dense(2, activation="relu", name="layer1"),
        layers.Dense(3, activation="relu", name="layer2"),
        layers.Dense(4, name="layer3"),
    ]
)
# Call model on a test input
x = np.ones((3, 3), dtype="float32")
y = model(x)
results["call"] = np.asarray(y)

# -- Creating a Sequential model ---------------------------------------------
model = keras.Sequential(
    [
        layers.Dense(2, activation="relu"),
        layers.Dense(3, activation="relu"),
        layers.Dense(4),
    ]
)
results["layer_count"] = len(model.layers)

model = keras.Sequential()
model.add(layers.Dense(2, activation="relu"))
model.add(layers.Dense(3, activation="relu"))
model.add(layers.Dense(4))
results["after_add"] = len(model.layers)

model.pop()
results["after_pop"] = len(model.layers)   # 2

model = keras.Sequential(name="my_sequential")
model.add(layers.Dense(2, activation="relu", name="layer1"))
model.add(layers.Dense(3, activation="relu", name="layer2"))
model.add(layers.Dense(4, name="layer3"))
results["names"] = [model.name] + [layer.name for layer in model.layers]

# -- Specifying the input shape in advance ------------------------------------
model = keras.Sequential(
    [
        layers.Dense(2, activation="relu"),
        layers.Dense(3, activation="relu"),
        layers.Dense(4),
    ]
)  # No weights at this stage!
results["built_before_call"] = model.built

# Call the model on a test input
x = np.ones((1, 4), dtype="float32")
y = model(x)
results["weights_after_call"] = len(model.weights)   # 6
results["shapes_after_call"] = weight_shapes(model)
results["output_after_call"] = np.asarray(y)

model = keras.Sequential()
model.add(keras.Input(shape=(4,)))
model.add(layers.Dense(2, activation="relu"))
results["layers_with_input"] = len(model.layers)   # the Input is not a layer
results["built_with_input"] = model.built
model.summary()
results["params_with_input"] = model.count_params()

# the older way, an input_shape argument to the first layer, works too
model = keras.Sequential()
model.add(layers.Dense(2, activation="relu", input_shape=(4,)))
results["weights_with_input_shape"] = [list(w.shape) for w in model.weights]

# -- A common debugging workflow: add() + summary() ---------------------------
model = keras.Sequential()
model.add(keras.Input(shape=(64,)))
model.add(layers.Dense(32, activation="relu"))
model.add(layers.Dense(16, activation="relu"))
# Can you guess what the current output shape is at this point? Probably not.
# Let's just print it:
model.summary()
results["params_two_layers"] = model.count_params()
model.add(layers.Dense(16, activation="relu"))
model.add(layers.Dense(8, activation="relu"))
model.summary()
results["params_four_layers"] = model.count_params()
results["shapes_four_layers"] = weight_shapes(model)

# -- What to do once you have a model: train, evaluate, predict ---------------
rng = np.random.default_rng(0)
x_train = rng.standard_normal((96, 64)).astype("float32")
y_train = np.tanh(x_train @ rng.standard_normal((64, 8)) / 8).astype("float32")
model.compile(optimizer="adam", loss="mse")
history = model.fit(x_train, y_train, batch_size=32, epochs=3, shuffle=False, verbose=0)
results["history"] = history.history
results["evaluate"] = model.evaluate(x_train, y_train, verbose=0)
results["predict"] = model.predict(x_train[:4], verbose=0)

# -- Transfer learning: freeze all layers except the last one ----------------
for layer in model.layers[:-1]:
    layer.trainable = False
results["trainable_weights"] = len(model.trainable_weights)      # 2
results["non_trainable_weights"] = len(model.non_trainable_weights)   # 6
frozen = [w.copy() for w in model.get_weights()[:-2]]
# Recompile and train (this will only update the weights of the last layer).
model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
history = model.fit(x_train, y_train, batch_size=32, epochs=2, shuffle=False, verbose=0)
results["fine_tune_history"] = history.history
results["frozen_unchanged"] = all(
    np.array_equal(a, b) for a, b in zip(frozen, model.get_weights()[:-2])
)
results["layer_weights"] = [len(layer.get_weights()) for layer in model.layers]
