"""Distribution helpers: logical CPU replicas, which worker is the chief, and a barrier."""

from __future__ import annotations

from typing import Callable

import tensorflow as tf


def mirrored_on_cpus(count: int = 2) -> tf.distribute.MirroredStrategy:
    """MirroredStrategy over `count` logical CPU devices, to try data parallelism without GPUs.

    Splitting the CPU must happen before TensorFlow starts its runtime, so create this strategy
    first thing in the process (`pipeline.run.train` does).

    Args:
        count: how many replicas.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    return tf.distribute.MirroredStrategy([f"/cpu:{index}" for index in range(count)])


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True unless this process is a non-chief worker of a multi-worker strategy (TF_CONFIG)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Returns once every worker has reached it: an all-reduce of one number (free on one worker)."""
    strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)


def in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
    """True for a MultiWorkerMirroredStrategy that really spans several workers."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
        strategy.extended._in_multi_worker_mode()
    )


def fix_keras_multi_worker_fit(model, strategy: tf.distribute.Strategy,
                               train: Callable[[int, int], tf.data.Dataset]) -> None:
    """Lets `model.fit` run under MultiWorkerMirroredStrategy, which Keras 3 breaks in two places.

    Keras 3 (checked up to 3.15) fails on several workers (keras-team/keras#20585,
    tensorflow/tensorflow#72388): (1) `fit` builds the model from a batch averaged across workers
    with an all-reduce that cannot take a nested (inputs, labels) batch; (2) it averages the
    scalar logs along axis 0. Here (1) the model is built from one local batch instead, and (2)
    multi-worker log averaging uses `axis=None`. Training itself is untouched: the result equals
    one worker's (tests/test_distribute.py). A no-op outside multi-worker mode.

    Args:
        model: the compiled model, built in `strategy.scope()`.
        strategy: the run's strategy.
        train: the task's `TaskData.train`; the first batch builds the model. Called only in
            multi-worker mode: building the dataset costs up to a second.
    """
    if not in_multi_worker_mode(strategy):
        return
    from keras.src.backend.tensorflow import trainer

    if not getattr(trainer.reduce_per_replica, "multi_worker_fixed", False):
        keras_reduce = trainer.reduce_per_replica

        def reduce_per_replica(values, strategy, reduction):
            if trainer._collective_all_reduce_multi_worker(strategy) and reduction in ("auto", "mean"):
                return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
            return keras_reduce(values, strategy, reduction)

        reduce_per_replica.multi_worker_fixed = True
        trainer.reduce_per_replica = reduce_per_replica
    with strategy.scope():
        model._symbolic_build(data_batch=next(iter(train(0, 1))))
    model._maybe_symbolic_build = lambda *args, **kwargs: None
