"""Save, serialize, and export models, after the keras.io guide of that
name: the whole model in a ``.keras`` file, configurations (get_config /
from_config, to_json / model_from_json, clone_model), moving weights
between models (get_weights / set_weights) and weights-only files
(``.weights.h5``).

Left out: custom objects (custom layers and functions registered for
serialization, ``custom_object_scope``), subclassed and functional models,
``model.export`` to a TensorFlow SavedModel, and saving weights layer by
layer through ``save_own_variables``.
"""
import numpy as np

import keras

results = {}


def get_model():
    # Create a simple model.
    model = keras.Sequential([keras.Input(shape=(32,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(), loss="mean_squared_error")
    return model


rng = np.random.default_rng(0)
test_input = rng.random((128, 32)).astype("float32")
test_target = rng.random((128, 1)).astype("float32")

# -- Saving: the whole model ---------------------------------------------------
model = get_model()
# Train the model.
history = model.fit(test_input, test_target, shuffle=False, verbose=0)
results["history"] = history.history

# Calling `save('my_model.keras')` creates a zip archive `my_model.keras`.
model.save("my_model.keras")

# It can be used to reconstruct the model identically.
reconstructed_model = keras.models.load_model("my_model.keras")

# Let's check:
np.testing.assert_allclose(
    model.predict(test_input, verbose=0), reconstructed_model.predict(test_input, verbose=0)
)
results["reconstructed_predict"] = reconstructed_model.predict(test_input[:4], verbose=0)

# The reconstructed model is already compiled and has retained the optimizer
# state, so training can resume:
history = reconstructed_model.fit(test_input, test_target, shuffle=False, verbose=0)
results["resumed_history"] = history.history
results["resumed_iterations"] = int(np.asarray(reconstructed_model.optimizer.iterations))

# keras.models.save_model() is the same as model.save(), and
# keras.saving.load_model() the same as keras.models.load_model()
keras.models.save_model(model, "my_model_2.keras", overwrite=True)
results["second_file_predict"] = keras.saving.load_model("my_model_2.keras").predict(
    test_input[:4], verbose=0
)

# -- Layer configuration ---------------------------------------------------------
layer = keras.layers.Dense(3, activation="relu")
layer_config = layer.get_config()
new_layer = keras.layers.Dense.from_config(layer_config)
results["layer_config"] = {
    key: layer_config[key] for key in ("units", "activation", "use_bias", "trainable")
}
results["new_layer"] = [new_layer.units, new_layer.get_config()["activation"]]

# -- Sequential model configuration --------------------------------------------
model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(1)])
config = model.get_config()
new_model = keras.Sequential.from_config(config)
# (default layer names are numbered differently: Keras counts every layer made)
results["from_config"] = [[type(layer).__name__ for layer in new_model.layers],
                          [list(w.shape) for w in new_model.weights]]

# -- to_json() and keras.models.model_from_json() ------------------------------
model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(1)])
json_config = model.to_json()
new_model = keras.models.model_from_json(json_config)
results["from_json"] = [[type(layer).__name__ for layer in new_model.layers],
                        [list(w.shape) for w in new_model.weights]]

# -- In-memory model cloning ---------------------------------------------------------
# (the guide clones inside a custom_object_scope, for its custom layer)
new_model = keras.models.clone_model(model)
results["clone"] = [type(new_model).__name__, [list(w.shape) for w in new_model.weights]]


# -- Transferring weights from one model to another in memory --------------------
def create_model():
    return keras.Sequential(
        [
            keras.Input(shape=(784,), name="digits"),
            keras.layers.Dense(64, activation="relu", name="dense_1"),
            keras.layers.Dense(64, activation="relu", name="dense_2"),
            keras.layers.Dense(10, name="predictions"),
        ]
    )


functional_model = create_model()   # a Sequential one here
functional_model.compile(optimizer="rmsprop", loss="mse")
digits_like = rng.random((8, 784)).astype("float32")
sequential_model = create_model()
sequential_model.set_weights(functional_model.get_weights())
np.testing.assert_allclose(
    functional_model.predict(digits_like, verbose=0),
    sequential_model.predict(digits_like, verbose=0),
)
# layer by layer, between models of the same architecture
for source, target in zip(functional_model.layers, create_model().layers):
    target.set_weights(source.get_weights())
results["transfer_predict"] = sequential_model.predict(digits_like, verbose=0)

# -- Weights-only saving & loading -----------------------------------------------------
sequential_model.save_weights("ckpt.weights.h5")
load_status = sequential_model.load_weights("ckpt.weights.h5")
fresh_model = create_model()
fresh_model.load_weights("ckpt.weights.h5")
np.testing.assert_allclose(
    sequential_model.predict(digits_like, verbose=0), fresh_model.predict(digits_like, verbose=0)
)

# weights-only files keep the optimizer state of a compiled, trained model
model = get_model()
model.fit(test_input, test_target, batch_size=64, shuffle=False, verbose=0)
model.save_weights("trained.weights.h5")
restored = get_model()
restored.fit(test_input[:1], test_target[:1], verbose=0)   # creates the optimizer state
restored.load_weights("trained.weights.h5")
history = restored.fit(test_input, test_target, batch_size=64, shuffle=False, verbose=0)
results["weights_resumed_history"] = history.history
history = model.fit(test_input, test_target, batch_size=64, shuffle=False, verbose=0)
results["original_continued_history"] = history.history
