"""Training & evaluation with the built-in methods, after the keras.io guide
of that name, on scikit-learn's bundled digits (8x8 images, 10 classes) in
place of the MNIST download.

Left out: the functional API (the guide's model is written as a Sequential
one), custom losses, metrics and layers written with ``keras.ops``
(subclasses of ``Loss``, ``Metric`` and ``Layer``, ``add_loss``), tf.data
and PyDataset inputs, multi-input and multi-output models, and
TensorBoard.
"""
import csv
import os

import numpy as np
from sklearn.datasets import load_digits

import keras
from keras import layers

results = {}

# -- API overview: a first end-to-end example --------------------------------
digits = load_digits()
x = (digits.data / 16.0).astype("float32")
y = digits.target.astype("int64")
x_train, y_train = x[:1200], y[:1200]
x_test, y_test = x[1200:], y[1200:]
# Reserve 300 samples for validation
x_val = x_train[-300:]
y_val = y_train[-300:]
x_train = x_train[:-300]
y_train = y_train[:-300]

model = keras.Sequential(
    [
        keras.Input(shape=(64,), name="digits"),
        layers.Dense(64, activation="relu", name="dense_1"),
        layers.Dense(64, activation="relu", name="dense_2"),
        layers.Dense(10, activation="softmax", name="predictions"),
    ]
)
model.compile(
    optimizer=keras.optimizers.RMSprop(),  # Optimizer
    # Loss function to minimize
    loss=keras.losses.SparseCategoricalCrossentropy(),
    # List of metrics to monitor
    metrics=[keras.metrics.SparseCategoricalAccuracy()],
)
history = model.fit(
    x_train,
    y_train,
    batch_size=64,
    epochs=2,
    shuffle=False,
    # We pass some validation for
    # monitoring validation loss and metrics
    # at the end of each epoch
    validation_data=(x_val, y_val),
    verbose=0,
)
results["first_history"] = history.history

# Evaluate the model on the test data using `evaluate`
results["evaluate"] = model.evaluate(x_test, y_test, batch_size=128, verbose=0)
# Generate predictions (probabilities -- the output of the last layer)
# on new data using `predict`
predictions = model.predict(x_test[:3], verbose=0)
results["predictions_shape"] = list(predictions.shape)
results["predictions"] = predictions


# -- The compile() method: specifying a loss, metrics, and an optimizer -------
def get_uncompiled_model():
    return keras.Sequential(
        [
            keras.Input(shape=(64,), name="digits"),
            layers.Dense(64, activation="relu", name="dense_1"),
            layers.Dense(64, activation="relu", name="dense_2"),
            layers.Dense(10, activation="softmax", name="predictions"),
        ]
    )


def get_compiled_model():
    model = get_uncompiled_model()
    # the optimizer, loss and metrics as strings
    model.compile(
        optimizer="rmsprop",
        loss="sparse_categorical_crossentropy",
        metrics=["sparse_categorical_accuracy"],
    )
    return model


# -- Using a validation split ----------------------------------------------------
model = get_compiled_model()
history = model.fit(x_train, y_train, batch_size=64, validation_split=0.2, epochs=1,
                    shuffle=False, verbose=0)
results["validation_split"] = history.history

# -- Using sample weighting and class weighting --------------------------------
class_weight = {i: 1.0 for i in range(10)}
# Set weight "2" for class "5", making this class 2x more important
class_weight[5] = 2.0
model = get_uncompiled_model()
model.compile(
    optimizer=keras.optimizers.RMSprop(learning_rate=1e-3),
    loss=keras.losses.SparseCategoricalCrossentropy(),
    metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
)
history = model.fit(x_train, y_train, class_weight=class_weight, batch_size=64, epochs=1,
                    shuffle=False, verbose=0, validation_data=(x_val, y_val))
results["class_weight"] = history.history
results["class_weight_evaluate"] = model.evaluate(x_test, y_test, verbose=0, return_dict=True)

sample_weight = np.ones(shape=(len(y_train),))
sample_weight[y_train == 5] = 2.0
model = get_compiled_model()
history = model.fit(x_train, y_train, sample_weight=sample_weight, batch_size=64, epochs=1,
                    shuffle=False, verbose=0)
results["sample_weight"] = history.history
results["weighted_evaluate"] = model.evaluate(
    x_test, y_test, sample_weight=np.where(y_test == 5, 2.0, 1.0), verbose=0
)

# -- Using callbacks: early stopping ---------------------------------------------
model = get_compiled_model()
callbacks = [
    keras.callbacks.EarlyStopping(
        # Stop training when `val_loss` is no longer improving
        monitor="val_loss",
        # "no longer improving" being defined as "no better than 2e-1 less"
        min_delta=2e-1,
        # "no longer improving" being further defined as "for at least 1 epoch"
        patience=1,
        verbose=1,
    ),
    # and the logs of each epoch in a CSV file
    keras.callbacks.CSVLogger("training.log"),
]
history = model.fit(x_train, y_train, epochs=20, batch_size=64, callbacks=callbacks,
                    validation_split=0.2, shuffle=False, verbose=0)
results["early_stopping"] = history.history
results["early_stopping_epochs"] = len(history.epoch)
with open("training.log") as f:
    rows = list(csv.reader(f))
results["csv_header"] = rows[0]
results["csv_values"] = [[float(value) for value in row] for row in rows[1:]]

# -- Checkpointing models ---------------------------------------------------------
model = get_compiled_model()
callbacks = [
    keras.callbacks.ModelCheckpoint(
        # Path where to save the model
        # The two parameters below mean that we will overwrite
        # the current checkpoint if and only if
        # the `val_loss` score has improved.
        # The saved model name will include the current epoch.
        filepath="mymodel_{epoch}.keras",
        save_best_only=True,  # Only save a model if `val_loss` has improved.
        monitor="val_loss",
        verbose=1,
    )
]
history = model.fit(x_train, y_train, epochs=2, batch_size=64, callbacks=callbacks,
                    validation_split=0.2, shuffle=False, verbose=0)
results["checkpoints"] = sorted(name for name in os.listdir(".") if name.endswith(".keras"))
restored = keras.models.load_model("mymodel_2.keras")
results["checkpoint_evaluate"] = restored.evaluate(x_test, y_test, verbose=0)

# -- Checkpointing for fault tolerance: restore the latest checkpoint ----------
# Prepare a directory to store all the checkpoints.
checkpoint_dir = "./ckpt"
if not os.path.exists(checkpoint_dir):
    os.makedirs(checkpoint_dir)


def make_or_restore_model():
    # Either restore the latest model, or create a fresh one
    # if there is no checkpoint available.
    checkpoints = [checkpoint_dir + "/" + name for name in os.listdir(checkpoint_dir)]
    if checkpoints:
        latest_checkpoint = max(checkpoints, key=os.path.getctime)
        print("Restoring from", latest_checkpoint)
        return keras.models.load_model(latest_checkpoint)
    print("Creating a new model")
    return get_compiled_model()


for run in range(2):
    model = make_or_restore_model()
    callbacks = [
        # This callback saves the model every 5 batches.
        # We include the training loss in the saved model name.
        keras.callbacks.ModelCheckpoint(
            filepath=checkpoint_dir + "/model-loss={loss:.2f}.keras", save_freq=5
        )
    ]
    history = model.fit(x_train, y_train, epochs=1, callbacks=callbacks, shuffle=False,
                        verbose=0)
    results[f"fault_tolerance_{run}"] = history.history
results["fault_tolerance_files"] = sorted(os.listdir(checkpoint_dir))

# -- One-hot targets: categorical cross-entropy -----------------------------------
model = get_uncompiled_model()
model.compile(
    optimizer=keras.optimizers.Adam(learning_rate=1e-3),
    loss=keras.losses.CategoricalCrossentropy(),
    metrics=[keras.metrics.CategoricalAccuracy(), keras.metrics.TopKCategoricalAccuracy(k=3)],
)
y_train_one_hot = keras.utils.to_categorical(y_train, num_classes=10)
history = model.fit(x_train, y_train_one_hot, batch_size=64, epochs=1, shuffle=False,
                    verbose=0)
results["one_hot"] = history.history

# -- Using learning rate schedules -------------------------------------------------
initial_learning_rate = 0.1
lr_schedule = keras.optimizers.schedules.ExponentialDecay(
    initial_learning_rate, decay_steps=10, decay_rate=0.96, staircase=True
)
optimizer = keras.optimizers.SGD(learning_rate=lr_schedule)
model = get_uncompiled_model()
model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
              metrics=["accuracy"])
history = model.fit(x_train, y_train, epochs=2, batch_size=64, shuffle=False, verbose=0)
results["schedule"] = history.history
results["schedule_rate"] = float(np.asarray(model.optimizer.learning_rate))

# another of the built-in schedules: constant pieces
lr_schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
    boundaries=[5, 20], values=[0.1, 0.05, 0.01]
)
model = get_uncompiled_model()
model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr_schedule, momentum=0.9),
              loss="sparse_categorical_crossentropy", metrics=["accuracy"])
history = model.fit(x_train, y_train, epochs=2, batch_size=64, shuffle=False, verbose=0)
results["piecewise"] = history.history
results["piecewise_rate"] = float(np.asarray(model.optimizer.learning_rate))

# -- Dynamic learning rate schedules: ReduceLROnPlateau ------------------------
model = get_uncompiled_model()
model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5),
              loss="sparse_categorical_crossentropy", metrics=["accuracy"])
callbacks = [keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0,
                                               min_delta=10.0, verbose=1)]
history = model.fit(x_train, y_train, epochs=3, batch_size=64, callbacks=callbacks,
                    shuffle=False, verbose=0)
results["reduce_lr"] = history.history
