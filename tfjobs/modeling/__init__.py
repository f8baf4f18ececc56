"""Model building blocks and training loops, written with backend-agnostic Keras.

=========================  ============================================================
:mod:`.models`             the model kinds a spec or the trigger form picks, and their builders
:mod:`.layers`             custom layers and weight hooks (registered for ``.keras`` files)
:mod:`.subclassed_models`  ``keras.Model`` subclasses: residual, wide & deep, reconstructing
:mod:`.losses`             the Huber loss; :mod:`.metrics`: its streaming metric
:mod:`.custom_loop`        the ``tf.GradientTape`` training loop (two optimizers for wide & deep)
:mod:`.in_memory`          training from device memory under JAX (stacked steps per compiled call)
=========================  ============================================================
"""
