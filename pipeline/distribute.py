"""Distribution: tf.distribute strategies and keras.distribution (JAX), which worker is the chief, a barrier."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import keras
import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

# Strategies whose `_target_` builds a keras.distribution (JAX); `get_strategy` is TensorFlow's
# default, which is one device under either backend. Every other target is tf.distribute.
JAX_STRATEGIES = {"pipeline.distribute.data_parallel"}
EITHER_BACKEND = {"tensorflow.distribute.get_strategy"}
KERAS_DISTRIBUTIONS = (keras.distribution.DataParallel, keras.distribution.ModelParallel)


def check_backend(target: str, choice: str | None = None) -> None:
    """Stops a run whose strategy needs the other Keras backend, before anything starts.

    Args:
        target: the strategy config's `_target_`.
        choice: the `strategy=` option, named in the message when known.
    """
    backend = keras.backend.backend()
    name = f"strategy={choice}" if choice else f"the strategy {target}"
    if target in JAX_STRATEGIES and backend != "jax":
        raise ValueError(f"{name} is keras.distribution, which needs KERAS_BACKEND=jax; the backend is "
                         f"{backend}. Run KERAS_BACKEND=jax python train.py ..., or use strategy=mirrored "
                         "(tf.distribute) under TensorFlow.")
    if target not in JAX_STRATEGIES | EITHER_BACKEND and backend != "tensorflow":
        raise ValueError(f"{name} is tf.distribute, which needs KERAS_BACKEND=tensorflow; the backend is "
                         f"{backend}. Under JAX use strategy=data_parallel (every device, several hosts) "
                         "or strategy=default (one device).")


def data_parallel(coordinator_address: str | None = None, num_processes: int | str | None = 1,
                  process_id: int | str | None = None) -> keras.distribution.DataParallel:
    """keras.distribution.DataParallel over every device of every process (JAX), set globally.

    With several processes (hosts) it first joins them with `jax.distributed.initialize`, so call it
    before any JAX computation (`pipeline.run.train` does). Each batch is then split over all
    devices of all processes; `even_batches` gives each process its share.

    Args:
        coordinator_address: `host:port` of process 0, which every process connects to.
        num_processes: how many processes train the model (1: this one alone, no coordinator).
        process_id: this process's number, 0 to num_processes - 1; 0 caches and writes reports.
    """
    import jax

    num_processes = int(num_processes or 1)
    if num_processes > 1 and not jax.distributed.is_initialized():
        if not coordinator_address or process_id is None:
            raise ValueError(
                f"strategy=data_parallel with num_processes={num_processes} needs "
                f"strategy.coordinator_address (host:port of process 0) and strategy.process_id (0 to "
                f"{num_processes - 1}); got {coordinator_address!r} and {process_id!r}. Set them, or "
                "JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID in the environment.")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=int(process_id))
    # auto_shard_dataset=False: Keras's sharding rebatches a short last batch onto one process
    # only, which stalls the others; even_batches shares every batch out instead.
    distribution = keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)
    keras.distribution.set_distribution(distribution)
    log.info("data_parallel over %d devices in %d processes (this is process %d)", jax.device_count(),
             jax.process_count(), jax.process_index())
    return distribution


def _multi_process() -> bool:
    """True when this JAX process is one of several that train one model."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.process_count() > 1


def saving_is_collective() -> bool:
    """True when every process must take part in each save (JAX over several processes).

    Keras gathers arrays that span processes while saving, so a process that skips a save leaves
    the others waiting; non-chief processes save too, into folders they delete.
    """
    return _multi_process()


def even_batches(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """This process's share of each batch, the batch first padded to split evenly over the devices.

    keras.distribution shards each batch equally over every device, so a batch whose size does not
    divide (the last of an epoch, FCN's single images) is padded by repeating its own examples;
    with several processes each takes its contiguous slice. A no-op without a multi-device
    keras.distribution (TensorFlow splits uneven batches by itself).

    Args:
        dataset: batches of (inputs, labels) tensors.
    """
    distribution = keras.distribution.distribution() if keras.backend.backend() == "jax" else None
    if distribution is None or distribution.num_model_replicas == 1:
        return dataset
    import jax

    devices, processes, index = distribution.num_model_replicas, jax.process_count(), jax.process_index()

    def share(*batch):
        size = tf.shape(tf.nest.flatten(batch)[0])[0]
        padded = (size + devices - 1) // devices * devices
        rows = tf.range(padded) % size  # repeats the first examples to fill the last shard
        part = padded // processes
        rows = rows[index * part:(index + 1) * part]
        return tf.nest.map_structure(lambda t: tf.gather(t, rows), batch)

    return dataset.map(share, num_parallel_calls=tf.data.AUTOTUNE)


@contextlib.contextmanager
def _no_distribution() -> Iterator[None]:
    """Variables created inside live on this process's default device (JAX)."""
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(distribution)


def local_predictor(model: keras.Model) -> Callable[[object], np.ndarray]:
    """`batch -> numpy outputs` that runs on this process alone, compiled, under either backend.

    Keras's compiled predict function (a `tf.function` on TensorFlow, `jax.jit` on JAX) of a
    model that shares `model`'s layers but was built outside its distribution. Under
    MultiWorkerMirroredStrategy the chief predicts alone, and `model.predict` would wait for the
    other workers to join its all-gather; under several JAX processes the model's arrays span
    every process, so the chief predicts with a local copy of the weights.

    Args:
        model: a Functional model (trained or frozen).
    """
    if _multi_process():
        with _no_distribution():
            local = keras.models.clone_model(model)
        local.set_weights(model.get_weights())  # replicated arrays: every process holds all of it
    else:
        local = keras.Model(model.inputs, model.outputs, name=f"{model.name}_predictor")

    def predict(batch) -> np.ndarray:
        return np.asarray(local.predict_on_batch(np.asarray(batch)))

    return predict


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


def is_chief(strategy) -> bool:
    """True unless this process is a non-chief worker (TF_CONFIG) or JAX process other than 0."""
    if isinstance(strategy, KERAS_DISTRIBUTIONS):
        import jax

        return jax.process_index() == 0
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def barrier(strategy, name: str = "barrier") -> None:
    """Returns once every worker has reached it: an all-reduce of one number (free on one worker).

    Args:
        strategy: a tf.distribute strategy or a keras.distribution.
        name: what the processes wait for (JAX matches barriers by name).
    """
    if isinstance(strategy, KERAS_DISTRIBUTIONS):
        if _multi_process():
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)
        return
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
