"""Writing your own callbacks, after the keras.io guide of that name, on
scikit-learn's bundled digits in place of the MNIST download (the guide's
regression of the digit's label on its pixels).

Every hook of a ``keras.callbacks.Callback`` subclass records its name, its
index and its logs, in fit, evaluate and predict; then the guide's
examples: printing the loss at each batch, early stopping at the minimum
loss, and a learning-rate scheduler. Left out: nothing of the guide but its
printing, replaced by recording.
"""
import numpy as np
from sklearn.datasets import load_digits

import keras

results = {}


# Define the Keras model to add callbacks to
def get_model():
    model = keras.Sequential()
    model.add(keras.layers.Dense(1))
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=0.1),
        loss="mean_squared_error",
        metrics=["mean_absolute_error"],
    )
    return model


# Load example digits data
digits = load_digits()
x = (digits.data / 16.0).astype("float32")
y = digits.target.astype("float32")
# Limit the data to 200 samples, and 100 for testing
x_train, y_train = x[:200], y[:200]
x_test, y_test = x[1000:1100], y[1000:1100]


def plain_logs(logs):
    return {key: float(np.asarray(value)) for key, value in sorted((logs or {}).items())}


# -- A basic example: every hook --------------------------------------------------
class CustomCallback(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_begin(self, logs=None):
        self.seen.append(["on_train_begin", plain_logs(logs)])

    def on_train_end(self, logs=None):
        self.seen.append(["on_train_end", plain_logs(logs)])

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(["on_epoch_begin", epoch, plain_logs(logs)])

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(["on_epoch_end", epoch, plain_logs(logs)])

    def on_test_begin(self, logs=None):
        self.seen.append(["on_test_begin", plain_logs(logs)])

    def on_test_end(self, logs=None):
        self.seen.append(["on_test_end", plain_logs(logs)])

    def on_predict_begin(self, logs=None):
        self.seen.append(["on_predict_begin", plain_logs(logs)])

    def on_predict_end(self, logs=None):
        self.seen.append(["on_predict_end", plain_logs(logs)])

    def on_train_batch_begin(self, batch, logs=None):
        self.seen.append(["on_train_batch_begin", batch, plain_logs(logs)])

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(["on_train_batch_end", batch, plain_logs(logs)])

    def on_test_batch_begin(self, batch, logs=None):
        self.seen.append(["on_test_batch_begin", batch, plain_logs(logs)])

    def on_test_batch_end(self, batch, logs=None):
        self.seen.append(["on_test_batch_end", batch, plain_logs(logs)])

    def on_predict_batch_begin(self, batch, logs=None):
        self.seen.append(["on_predict_batch_begin", batch, sorted(logs or {})])

    def on_predict_batch_end(self, batch, logs=None):
        # the logs hold the batch's outputs: their shape is what both agree on
        self.seen.append(["on_predict_batch_end", batch,
                          list(np.shape(logs["outputs"])) if logs else None])


model = get_model()
callback = CustomCallback()
model.fit(
    x_train,
    y_train,
    batch_size=128,
    epochs=2,
    shuffle=False,
    verbose=0,
    validation_split=0.5,
    callbacks=[callback],
)
results["fit_hooks"] = callback.seen

callback = CustomCallback()
res = model.evaluate(x_test, y_test, batch_size=128, verbose=0, callbacks=[callback])
results["evaluate_hooks"] = callback.seen
results["evaluate"] = res

callback = CustomCallback()
res = model.predict(x_test, batch_size=64, callbacks=[callback], verbose=0)
results["predict_hooks"] = callback.seen
results["predictions"] = res


# -- Usage of logs dict -------------------------------------------------------------
class LossAndErrorPrintingCallback(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.lines = []

    def on_train_batch_end(self, batch, logs=None):
        self.lines.append(
            "Up to batch {}, the average loss is {:7.2f}.".format(batch, logs["loss"])
        )

    def on_test_batch_end(self, batch, logs=None):
        self.lines.append(
            "Up to batch {}, the average loss is {:7.2f}.".format(batch, logs["loss"])
        )

    def on_epoch_end(self, epoch, logs=None):
        self.lines.append(
            "The average loss for epoch {} is {:7.2f} "
            "and mean absolute error is {:7.2f}.".format(
                epoch, logs["loss"], logs["mean_absolute_error"]
            )
        )


model = get_model()
printer = LossAndErrorPrintingCallback()
model.fit(x_train, y_train, batch_size=128, epochs=2, shuffle=False, verbose=0,
          callbacks=[printer])
res = model.evaluate(x_test, y_test, batch_size=128, verbose=0, callbacks=[printer])
results["printed"] = printer.lines


# -- Usage of self.model attribute: early stopping at minimum loss --------------------
class EarlyStoppingAtMinLoss(keras.callbacks.Callback):
    """Stop training when the loss is at its min, i.e. the loss stops decreasing.

    Arguments:
        patience: Number of epochs to wait after min has been hit. After this
        number of no improvement, training stops.
    """

    def __init__(self, patience=0):
        super().__init__()
        self.patience = patience
        # best_weights to store the weights at which the minimum loss occurs.
        self.best_weights = None

    def on_train_begin(self, logs=None):
        # The number of epoch it has waited when loss is no longer minimum.
        self.wait = 0
        # The epoch the training stops at.
        self.stopped_epoch = 0
        # Initialize the best as infinity.
        self.best = np.inf

    def on_epoch_end(self, epoch, logs=None):
        current = logs.get("loss")
        if np.less(current, self.best):
            self.best = current
            self.wait = 0
            # Record the best weights if current results is better (less).
            self.best_weights = self.model.get_weights()
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.stopped_epoch = epoch
                self.model.stop_training = True
                # Restoring model weights from the end of the best epoch.
                self.model.set_weights(self.best_weights)

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0:
            results["stopped_epoch"] = self.stopped_epoch + 1


model = get_model()
history = model.fit(
    x_train,
    y_train,
    batch_size=64,
    steps_per_epoch=2,
    epochs=30,
    shuffle=False,
    verbose=0,
    callbacks=[LossAndErrorPrintingCallback(), EarlyStoppingAtMinLoss()],
)
results["early_stopping_history"] = history.history
results["restored_evaluate"] = model.evaluate(x_test, y_test, verbose=0)


# -- Learning rate scheduling ---------------------------------------------------------
class CustomLearningRateScheduler(keras.callbacks.Callback):
    """Learning rate scheduler which sets the learning rate according to schedule.

    Arguments:
        schedule: a function that takes an epoch index
            (integer, indexed from 0) and current learning rate
            as inputs and returns a new learning rate as output (float).
    """

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.rates = []

    def on_epoch_begin(self, epoch, logs=None):
        if not hasattr(self.model.optimizer, "learning_rate"):
            raise ValueError('Optimizer must have a "learning_rate" attribute.')
        # Get the current learning rate from model's optimizer.
        lr = self.model.optimizer.learning_rate
        # Call schedule function to get the scheduled learning rate.
        scheduled_lr = self.schedule(epoch, lr)
        # Set the value back to the optimizer before this epoch starts
        self.model.optimizer.learning_rate = scheduled_lr
        self.rates.append(float(np.asarray(self.model.optimizer.learning_rate)))


LR_SCHEDULE = [
    # (epoch to start, learning rate) tuples
    (3, 0.05),
    (6, 0.01),
    (9, 0.005),
    (12, 0.001),
]


def lr_schedule(epoch, lr):
    """Helper function to retrieve the scheduled learning rate based on epoch."""
    if epoch < LR_SCHEDULE[0][0] or epoch > LR_SCHEDULE[-1][0]:
        return lr
    for i in range(len(LR_SCHEDULE)):
        if epoch == LR_SCHEDULE[i][0]:
            return LR_SCHEDULE[i][1]
    return lr


model = get_model()
scheduler = CustomLearningRateScheduler(lr_schedule)
history = model.fit(
    x_train,
    y_train,
    batch_size=64,
    steps_per_epoch=2,
    epochs=8,
    shuffle=False,
    verbose=0,
    callbacks=[scheduler],
)
results["scheduled_rates"] = scheduler.rates
results["scheduled_history"] = history.history
