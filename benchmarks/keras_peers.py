"""The Keras peers that benchmarks/run.py measures in the same run, executed by a Python with TensorFlow
(``--keras-python``; this file imports neither torch nor pneumonia_cnn).

    /tmp/tfenv/bin/python benchmarks/keras_peers.py '{"folder": ".../train", "size": 224, "batch_size": 32,
                                                      "steps": 20, "pipelines": ["tutorial", "tfdata_bf16"]}'

Pipelines, all with the tutorial's ``Sequential`` model, Adam and binary cross-entropy:

- ``tutorial``: the tutorial's own ``ImageDataGenerator.flow_from_directory`` (decodes and warps every image
  in Python on every epoch), and ``model.predict`` on the same generator without augmentation.
- ``tfdata`` / ``tfdata_bf16``: what a skilled Keras user writes instead: ``tf.data`` decoding each file once
  into an in-memory ``.cache()``, shuffling, batching, the same augmentation *meaning* (shear up to 0.2
  degrees, independent x/y zoom in [0.8, 1.2], horizontal flip, nearest-edge fill, bilinear) as one projective
  transform per batch in parallel ``map`` calls, ``prefetch``; in float32 or under the ``mixed_bfloat16``
  policy (the sigmoid head kept in float32, as Keras' mixed-precision guide does). Each is timed with XLA
  (``jit_compile=True``) and without, and the faster is reported (``jit_compile`` says which).

Prints one JSON line: ``{pipeline: {"training_images_per_s": ..., ...}, "tensorflow": ..., "keras": ...}``.
"""
import json
import math
import sys
import time
from pathlib import Path


def sequential_model(keras, size: int, float32_head: bool):
    layers = keras.layers
    return keras.Sequential([
        keras.Input((size, size, 3)), layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(128, 3, activation="relu"), layers.MaxPooling2D(2), layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dense(1, activation="sigmoid", dtype="float32" if float32_head else None)])


def tutorial(tf, keras, args) -> dict:
    try:
        from keras.preprocessing.image import ImageDataGenerator
    except ImportError:  # Keras 3 keeps the tutorial's generator in its legacy module
        from keras.src.legacy.preprocessing.image import ImageDataGenerator
    size, batch, steps, folder = args["size"], args["batch_size"], args["steps"], args["folder"]
    generator = ImageDataGenerator(rescale=1 / 255, shear_range=0.2, zoom_range=0.2, horizontal_flip=True)
    flow = generator.flow_from_directory(folder, target_size=(size, size), batch_size=batch, class_mode="binary")
    model = sequential_model(keras, size, float32_head=False)
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(flow, steps_per_epoch=2, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(flow, steps_per_epoch=steps, epochs=1, verbose=0)
    train_rate = steps * batch / (time.perf_counter() - start)
    plain = ImageDataGenerator(rescale=1 / 255).flow_from_directory(folder, target_size=(size, size),
                                                                    batch_size=batch, class_mode="binary",
                                                                    shuffle=False)
    model.predict(plain, steps=2, verbose=0)
    start = time.perf_counter()
    model.predict(plain, steps=steps, verbose=0)
    return {"training_images_per_s": train_rate, "predict_images_per_s": steps * batch / (time.perf_counter() - start)}


def decoded_dataset(tf, folder: str, size: int):
    """(uint8 image, label) for every file, decoded once: the first pass fills the in-memory cache."""
    paths, labels = [], []
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        found = sorted(str(p) for p in (Path(folder) / name).iterdir())
        paths += found
        labels += [float(label)] * len(found)

    def decode(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image = tf.image.resize(image, (size, size), method="bilinear")
        return tf.cast(tf.round(image), tf.uint8), label

    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE).cache()
    start = time.perf_counter()
    for _ in dataset:
        pass
    return dataset, len(paths), time.perf_counter() - start


def augment(tf, images, shear_degrees=0.2, zoom=0.2):
    """ImageDataGenerator's shear (degrees) and independent zooms about the centre, then a horizontal flip,
    as one projective transform of the batch (bilinear, nearest-edge fill)."""
    batch = tf.shape(images)[0]
    height, width = tf.cast(tf.shape(images)[1], tf.float32), tf.cast(tf.shape(images)[2], tf.float32)
    shear = tf.random.uniform([batch], -shear_degrees, shear_degrees) * math.pi / 180
    zoom_row = tf.random.uniform([batch], 1 - zoom, 1 + zoom)
    zoom_col = tf.random.uniform([batch], 1 - zoom, 1 + zoom)
    flip = tf.cast(tf.random.uniform([batch]) < 0.5, tf.float32)
    centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
    sign = 1 - 2 * flip  # output column x samples the unflipped column (width - 1 - x) when flipped
    a0 = tf.cos(shear) * zoom_col * sign
    a2 = centre_x - a0 * centre_x
    b0 = -tf.sin(shear) * zoom_col * sign
    b1 = zoom_row
    b2 = centre_y - b0 * centre_x - b1 * centre_y
    zeros = tf.zeros([batch])
    transforms = tf.stack([a0, zeros, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="NEAREST")


def tfdata(tf, keras, args, bf16: bool) -> dict:
    size, batch, steps = args["size"], args["batch_size"], args["steps"]
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if bf16 else "float32")
    cached, count, decode_seconds = decoded_dataset(tf, args["folder"], size)

    def prepare(images, labels):
        return augment(tf, tf.cast(images, tf.float32) / 255.0), labels

    dataset = (cached.shuffle(count, reshuffle_each_iteration=True).repeat().batch(batch, drop_remainder=True)
               .map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
    best = None
    for jit in (False, True):
        model = sequential_model(keras, size, float32_head=True)
        model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"], jit_compile=jit)
        model.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0)
        start = time.perf_counter()
        model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
        rate = steps * batch / (time.perf_counter() - start)
        if best is None or rate > best["training_images_per_s"]:
            best = {"training_images_per_s": rate, "jit_compile": jit}
        best[f"training_images_per_s_jit_{str(jit).lower()}"] = rate
    keras.mixed_precision.set_global_policy("float32")
    return {**best, "decode_once_seconds": decode_seconds, "images": count,
            "policy": "mixed_bfloat16" if bf16 else "float32"}


def main():
    args = json.loads(sys.argv[1])
    try:
        import tensorflow as tf
        from tensorflow import keras
    except ImportError as error:
        print(json.dumps({"skipped": f"TensorFlow is not importable ({error})"}))
        return
    runners = {"tutorial": lambda: tutorial(tf, keras, args), "tfdata": lambda: tfdata(tf, keras, args, False),
               "tfdata_bf16": lambda: tfdata(tf, keras, args, True)}
    results = {"tensorflow": tf.__version__, "keras": keras.__version__}
    for name in args.get("pipelines", ["tutorial", "tfdata_bf16"]):
        results[name] = runners[name]()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
