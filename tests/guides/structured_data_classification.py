"""Structured data classification from scratch, after the keras.io example
of that name: a binary classifier of tabular records, on scikit-learn's
bundled breast-cancer data (30 numeric features) in place of the
heart-disease CSV download.

The numeric features are standardized by a ``Normalization`` layer adapted
to the training rows, followed by Dense, Dropout and a sigmoid Dense
output trained with binary cross-entropy and accuracy. Left out: the
example's categorical features (``StringLookup`` / ``IntegerLookup``
encodings), ``FeatureSpace``, tf.data pipelines and the functional API with
one input per feature (the features arrive as one array here).
"""
import numpy as np
from sklearn.datasets import load_breast_cancer

import keras
from keras import layers

results = {}

# -- Preparing the data ----------------------------------------------------------
data = load_breast_cancer()
features = data.data.astype("float32")
target = data.target.astype("float32").reshape(-1, 1)
print("Number of samples:", len(features))

# a validation split of 20%, drawn at random as the example's
# dataframe.sample(frac=0.2, random_state=1337) does
order = np.random.default_rng(1337).permutation(len(features))
n_val = int(0.2 * len(features))
x_val, y_val = features[order[:n_val]], target[order[:n_val]]
x_train, y_train = features[order[n_val:]], target[order[n_val:]]
print(f"Using {len(x_train)} samples for training and {len(x_val)} for validation")

# -- Feature preprocessing: normalization adapted to the training data ----------
normalizer = layers.Normalization()
normalizer.adapt(x_train)
results["adapted_mean"] = np.asarray(normalizer.mean).ravel()
results["adapted_variance"] = np.asarray(normalizer.variance).ravel()

# -- Build a model ----------------------------------------------------------------
model = keras.Sequential(
    [
        keras.Input(shape=(features.shape[1],)),
        normalizer,
        layers.Dense(32, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(1, activation="sigmoid"),
    ]
)
model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
model.summary()

# -- Train the model ----------------------------------------------------------------
history = model.fit(x_train, y_train, batch_size=32, epochs=5, shuffle=False,
                    validation_data=(x_val, y_val), verbose=0)
results["history"] = history.history
results["evaluate"] = model.evaluate(x_val, y_val, verbose=0, return_dict=True)

# -- Inference on new data ------------------------------------------------------------
sample = x_val[:1]
predictions = model.predict(sample, verbose=0)
print(
    f"This particular tumour had a {100 * predictions[0][0]:.1f} "
    "percent probability of being benign, as evaluated by our model."
)
results["predictions"] = model.predict(x_val[:8], verbose=0)
