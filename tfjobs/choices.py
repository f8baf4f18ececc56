"""What a user can choose per run, with a description for the Airflow trigger form.

Kept free of TensorFlow and Keras imports: the DAG processor reads it to build the
form's enums. :mod:`tfjobs.modeling.models` registers one builder per model kind listed
here (a test checks that both lists agree); :mod:`tfjobs.train` builds the loss
and picks the training loop from the names listed here.
"""

MODEL_KINDS: dict[str, str] = {
    "mlp": "Multilayer perceptron: dense ReLU layers with dropout over all features",
    "residual": "Residual network: one residual block applied several times (shared weights), "
    "Gaussian input noise while training",
    "wide_deep": "Wide & deep: a linear model over one-hot features plus an MLP over embeddings; "
    "the custom loop trains the wide part with SGD and the deep part with Adam",
    "reconstruction": "Reconstructing MLP: also rebuilds the numeric features from noised inputs; "
    "the reconstruction error is an extra loss, reported as reconstruction_loss",
}

LOSSES: dict[str, str] = {
    "crossentropy": "Cross-entropy over the classes (classification)",
    "mse": "Mean squared error (regression): large errors weigh quadratically",
    "huber": "Huber (regression): squared below the spec's threshold (training.huber_delta), linear above; "
    "robust to outliers such as capped prices",
}
#: The losses each task accepts, its default first.
TASK_LOSSES: dict[str, tuple[str, ...]] = {
    "classification": ("crossentropy",),
    "regression": ("mse", "huber"),
}

#: The options of a spec's ``model:`` block that model kinds read, and their types (a hyperparameter
#: search samples them as such); :func:`tfjobs.modeling.models.register_model` names the same ones.
MODEL_OPTIONS: dict[str, str] = {
    "repeats": "int",  # residual: times the residual block is applied
    "noise_stddev": "float",  # residual, reconstruction: input noise while training
    "reconstruction_weight": "float",  # reconstruction: weight of the reconstruction error in the loss
    "wide_penalty": "float",  # wide_deep: GroupLasso factor of the wide part
    "max_norm": "float",  # wide_deep: cap on each deep unit's weight norm
}

TRAINING_LOOPS: dict[str, str] = {
    "fit": "Keras fit(): one Adam optimizer for every weight",
    "custom": "Shardline's GradientTape loop (tfjobs.modeling.custom_loop): same loss, metrics and callbacks as fit(); "
    "a wide & deep model gets SGD for its wide part and Adam for its deep part",
}

#: XLA compilation of the training step: Keras' "auto" uses it on GPUs when the model allows it.
JIT_COMPILE = ("auto", "true", "false")
