import h5py
import numpy as np
import pytest

from badnet_repair import UserError, data

SHAPE = (55, 47, 3)


def write(path, images, labels):
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=images)
        f.create_dataset("label", data=labels)
    return path


def images(n=4, layout="channels_first", fill=None):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(n, 55, 47, 3)).astype(np.float32)
    if fill is not None:
        x.flat[0] = fill
    return x.transpose(0, 3, 1, 2) if layout == "channels_first" else x


def test_channels_first_and_last_load_to_the_same_scaled_images(tmp_path):
    x = images(layout="channels_last")
    labels = np.array([0, 1, 2, 3], dtype=np.float32)
    first = data.load_h5(
        write(tmp_path / "f.h5", x.transpose(0, 3, 1, 2), labels), SHAPE, 5, 1 / 255, "f"
    )
    last = data.load_h5(write(tmp_path / "l.h5", x, labels), SHAPE, 5, 1 / 255, "l")
    assert first.x.shape == (4, 55, 47, 3) and first.x.dtype == np.float32
    np.testing.assert_array_equal(first.x, last.x)
    np.testing.assert_allclose(first.x, x / 255, rtol=1e-6)
    assert first.y.dtype == np.int64 and list(first.y) == [0, 1, 2, 3]


def test_demo_files_load(demo_data):
    validation, test, poisoned = demo_data
    assert validation.x.shape[1:] == SHAPE and 0 <= test.x.min() and test.x.max() <= 1
    assert len(validation) == 1200 and len(test) == 1600 and len(poisoned) == 1560


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"data": images()}, "dataset named 'label'"),
        ({"label": np.zeros(4)}, "dataset named 'data'"),
        ({"data": images()[:, :, :50], "label": np.zeros(4)}, "to match the model's input"),
        ({"data": images(), "label": np.zeros(3)}, "expected data"),
        ({"data": images()[:0], "label": np.zeros(0)}, "holds no images"),
        ({"data": images(fill=np.nan), "label": np.zeros(4)}, "NaN or infinite"),
        ({"data": images(fill=np.inf), "label": np.zeros(4)}, "NaN or infinite"),
        ({"data": images(), "label": np.array([0, 1, 2, 9])}, r"labels span \[0, 9\]"),
        ({"data": images(), "label": np.array([0, 1.5, 2, 3])}, "whole numbers"),
    ],
)
def test_malformed_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        for key, value in content.items():
            f.create_dataset(key, data=value)
    with pytest.raises(UserError, match=message) as err:
        data.load_h5(path, SHAPE, 5, 1 / 255, "bad")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        data.load_h5(tmp_path / "absent.h5", SHAPE, 5, 1 / 255, "x")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(UserError, match="not a readable HDF5 file"):
        data.load_h5(tmp_path / "text.h5", SHAPE, 5, 1 / 255, "x")


def test_split_is_seeded_and_disjoint(demo_data):
    validation = demo_data[0]
    rest, held = data.split(validation, 0.1, seed=3)
    again, _ = data.split(validation, 0.1, seed=3)
    assert len(held) == 120 and len(rest) == 1080
    np.testing.assert_array_equal(rest.y, again.y)
    flat = validation.x.reshape(len(validation), -1)[:, :8]
    rows = {tuple(r) for r in rest.x.reshape(len(rest), -1)[:, :8]}
    assert not rows & {tuple(r) for r in held.x.reshape(len(held), -1)[:, :8]}
    assert len(rows) + len(held) == len({tuple(r) for r in flat})
