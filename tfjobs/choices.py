"""What a user can choose per run, with a description for the Airflow trigger form.

Kept free of TensorFlow and Keras imports: the DAG processor reads it to build the
form's enums. :mod:`tfjobs.models` registers one builder per model kind listed
here (a test checks that both lists agree).
"""

MODEL_KINDS: dict[str, str] = {
    "mlp": "Multilayer perceptron: dense ReLU layers with dropout over all features",
}
