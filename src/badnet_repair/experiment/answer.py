"""A saved GoodNet's answers: one class per image file, or its rates on data sets.

    python -m badnet_repair.experiment.answer GOODNET IMAGE...           # one class per image
    python -m badnet_repair.experiment.answer GOODNET --clean FILE --poisoned NAME=FILE ...

A GoodNet for N classes answers N for an input it judges poisoned.
"""

import argparse
import sys
from pathlib import Path

from badnet_repair.console import quiet_native_logs

if __name__ == "__main__":
    quiet_native_logs()  # before TensorFlow loads

import numpy as np  # noqa: E402

from badnet_repair import UserError, data  # noqa: E402
from badnet_repair.defenses import goodnet  # noqa: E402
from badnet_repair.experiment.evaluate import batch_size_for, goodnet_metrics  # noqa: E402
from badnet_repair.network import models  # noqa: E402
from badnet_repair.network.predict import predict_classes  # noqa: E402


def read_image(
    path: str | Path, shape: tuple[int, int, int], scale: float, resize: bool = False
) -> np.ndarray:
    """A PNG or JPEG file as the model's (H, W, C) float32 input."""
    import tensorflow as tf

    path = Path(path)
    height, width, channels = shape
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"image {path}: cannot be read ({e.strerror or e})") from None
    try:
        image = tf.io.decode_image(raw, channels=channels, expand_animations=False)
    except (tf.errors.InvalidArgumentError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"image {path}: not a PNG or JPEG image ({reason})") from None
    if tuple(image.shape[:2]) != (height, width):
        if not resize:
            raise UserError(
                f"image {path}: {image.shape[0]}x{image.shape[1]} pixels, expected "
                f"{height}x{width} (height x width); pass --resize to resize it"
            )
        image = tf.image.resize(image, (height, width), method="bilinear", antialias=True)
    return tf.cast(image, tf.float32).numpy() * np.float32(scale)


def _poisoned_arg(value: str) -> tuple[str, Path]:
    name, sep, file = value.partition("=")
    if not sep or not name or not file:
        raise UserError(f"--poisoned {value}: expected NAME=FILE")
    return name, Path(file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m badnet_repair.experiment.answer",
        description="Answers of a GoodNet for images (N = poisoned), or its metrics on data sets.",
    )
    parser.add_argument("goodnet", type=Path, help="GoodNet model file (.h5)")
    parser.add_argument("images", nargs="*", type=Path, help="PNG or JPEG files")
    parser.add_argument("--resize", action="store_true", help="resize images to the input size")
    parser.add_argument("--scale", type=float, default=1 / 255, help="pixel scale (default 1/255)")
    parser.add_argument("--clean", type=Path, help="clean test set (.h5 with data and label)")
    parser.add_argument(
        "--poisoned", action="append", default=[], metavar="NAME=FILE", help="poisoned set (.h5)"
    )
    args = parser.parse_args(argv)
    try:
        if not args.images and args.clean is None:
            raise UserError("nothing to do: give image files, or --clean FILE [--poisoned ...]")
        if args.poisoned and args.clean is None:
            raise UserError("--poisoned needs --clean FILE as well")
        if not args.scale > 0:
            raise UserError(f"--scale {args.scale}: expected > 0")
        poisoned = dict(_poisoned_arg(v) for v in args.poisoned)
        model = goodnet.load_goodnet(args.goodnet)
        shape, n = models.input_shape(model), models.num_classes(model) - 1
        if args.images:
            x = np.stack([read_image(p, shape, args.scale, args.resize) for p in args.images])
            answers = predict_classes(model, x, batch_size_for(model))
            for path, answer in zip(args.images, answers, strict=True):
                print(f"{path}\t{int(answer)}")
        if args.clean is not None:
            clean = data.load_h5(args.clean, shape, n, args.scale, "clean")
            sets = {
                name: data.load_h5(f, shape, n, args.scale, name) for name, f in poisoned.items()
            }
            for key, value in goodnet_metrics(model, clean, sets, n).items():
                print(f"{key}\t{value:.6f}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
